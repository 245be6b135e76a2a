-- Gives back a reserved grant that never reached the upstream.
-- KEYS[1] grants, KEYS[2] emergency grants; ARGV[1] member.
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1

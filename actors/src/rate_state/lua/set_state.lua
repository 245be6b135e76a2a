-- Sets shared fields (health, reason, effective…) and tells the others.
-- KEYS[1] state; ARGV[1] channel, ARGV[2] message, ARGV[3] ttl ms,
-- ARGV[4..] field, value pairs.
for i = 4, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1

-- Sets shared fields (health, reason, effective…) and tells the others.
-- KEYS[1] state; ARGV[1] channel, ARGV[2] message, ARGV[3] ttl ms,
-- ARGV[4..] field, value pairs.
for i = 4, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
-- Never shortens a longer lifetime (a long cooldown's).
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1

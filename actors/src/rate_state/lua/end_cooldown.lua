-- Ends the shared cooldown early after an emergency probe succeeded, unless
-- a newer cooldown started after that probe was granted.
-- KEYS[1] state; ARGV[1] probe's grant time (server ms), ARGV[2] channel,
-- ARGV[3] message.
local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch')) or 0
if epoch > tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'until', 0, 'upstream_until', 0, 'streak', 0)
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1

-- Merges a cooldown into the shared state: the later deadline wins, the
-- longer streak wins, the epoch (start of the escalating cooldown) is the
-- server's now; then tells the other replicas.
-- KEYS[1] state; ARGV[1] until, ARGV[2] upstream_until, ARGV[3] streak,
-- ARGV[4] unused, ARGV[5] channel, ARGV[6] message, ARGV[7] minimum ttl ms,
-- ARGV[8] window ms.
local now = clock('')
local s = redis.call('HMGET', KEYS[1], 'until', 'upstream_until', 'streak', 'epoch')
local function later(a, b)
  a = tonumber(a) or 0
  b = tonumber(b) or 0
  if a > b then return a else return b end
end
local untl = later(s[1], ARGV[1])
redis.call('HSET', KEYS[1],
  'until', untl,
  'upstream_until', later(s[2], ARGV[2]),
  'streak', later(s[3], ARGV[3]),
  'epoch', later(s[4], now))
-- Outlive the cooldown by a window, whatever the minimum.
local ttl = later(tonumber(ARGV[7]), untl - now + tonumber(ARGV[8]))
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1

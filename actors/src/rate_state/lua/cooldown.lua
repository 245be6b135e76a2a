-- Merges a cooldown into the shared state: the later deadline wins, the
-- longer streak wins; then tells the other replicas.
-- KEYS[1] state; ARGV[1] until, ARGV[2] upstream_until, ARGV[3] streak,
-- ARGV[4] epoch (start of the escalating cooldown), ARGV[5] channel,
-- ARGV[6] message, ARGV[7] ttl ms.
local s = redis.call('HMGET', KEYS[1], 'until', 'upstream_until', 'streak', 'epoch')
local function later(a, b)
  a = tonumber(a) or 0
  b = tonumber(b) or 0
  if a > b then return a else return b end
end
redis.call('HSET', KEYS[1],
  'until', later(s[1], ARGV[1]),
  'upstream_until', later(s[2], ARGV[2]),
  'streak', later(s[3], ARGV[3]),
  'epoch', later(s[4], ARGV[4]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[7]))
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1

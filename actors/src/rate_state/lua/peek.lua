-- A key's shared state for views: window use and the state hash.
-- KEYS[1] grants, KEYS[2] state; ARGV[1] window ms, ARGV[2] now (tests only).
local now = clock(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]))
local used = redis.call('ZCARD', KEYS[1])
local s = redis.call('HMGET', KEYS[2], 'until', 'upstream_until', 'streak', 'health', 'effective')
return {used, now, tonumber(s[1]) or 0, tonumber(s[2]) or 0, tonumber(s[3]) or 0, s[4] or '', tonumber(s[5]) or 0}

-- Adds grants made while Redis was unreachable (times already in the
-- server's clock), so the shared window counts them.
-- KEYS[1] grants; ARGV[1] window ms, ARGV[2] member prefix, ARGV[3..] times.
for i = 3, #ARGV do
  redis.call('ZADD', KEYS[1], tonumber(ARGV[i]), ARGV[2] .. ':' .. i)
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 2)
return #ARGV - 2

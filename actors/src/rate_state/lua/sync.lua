-- Puts this replica's grants into the shared window after Redis was
-- unreachable (times already in the server's clock). Members are the ones
-- their reservations used, so a grant Redis still holds is not counted
-- twice, and one a restarted Redis lost is counted again.
-- KEYS[1] grants; ARGV[1] window ms, ARGV[2..] time, member pairs.
local n = 0
for i = 2, #ARGV - 1, 2 do
  -- NX: a reservation Redis still holds keeps its own (server) time.
  redis.call('ZADD', KEYS[1], 'NX', tonumber(ARGV[i]), ARGV[i + 1])
  n = n + 1
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 2)
return n

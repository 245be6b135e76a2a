-- The upstream's own Retry-After deadline within a cooldown: no request,
-- not even an emergency probe, reaches the key before it, across restarts.
ALTER TABLE backends ADD COLUMN upstream_until BIGINT;

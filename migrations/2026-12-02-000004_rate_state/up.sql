-- Each key's rolling grant log, saved off the request path so a restart
-- restores the window exactly (clean stop) or pessimistically (crash). The
-- save time and the clean-shutdown marker live in system_config.
CREATE TABLE rate_state (
    backend_id INTEGER PRIMARY KEY NOT NULL REFERENCES backends (id) ON DELETE CASCADE,
    -- JSON array of grant times, Unix milliseconds, oldest first.
    grants TEXT NOT NULL DEFAULT '[]',
    saved_at BIGINT NOT NULL
);

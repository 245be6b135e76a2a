-- Backends: configuration, the encrypted key, and the state that must survive
-- a restart (a restart never re-hammers a cooling key).
CREATE TABLE backends (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    name TEXT NOT NULL UNIQUE,
    base_url TEXT NOT NULL,
    -- 24-byte XChaCha20 nonce followed by the ciphertext and tag.
    api_key_enc BLOB NOT NULL,
    key_hint TEXT NOT NULL,
    pool TEXT NOT NULL CHECK (pool IN ('primary', 'fallback')),
    rpm_limit INTEGER NOT NULL CHECK (rpm_limit > 0),
    burst INTEGER,
    tpm_limit INTEGER,
    max_concurrency INTEGER,
    weight DOUBLE NOT NULL DEFAULT 1.0,
    timeout_secs DOUBLE NOT NULL DEFAULT 120.0,
    -- JSON object: canonical name -> {native, price_in, price_out}.
    models TEXT NOT NULL DEFAULT '{}',
    enabled BOOLEAN NOT NULL DEFAULT 1,
    -- 'config' (managed by the file, read-only in the API), 'api' or 'import'.
    source TEXT NOT NULL DEFAULT 'api',
    notes TEXT,
    -- healthy | down | error (cooling is derived from cooldown_until).
    status TEXT NOT NULL DEFAULT 'healthy',
    cooldown_until BIGINT,
    consecutive_429_count INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- One row per backend x canonical model x hour, upserted by the stats actor.
CREATE TABLE backend_usage_logs (
    backend_id INTEGER NOT NULL REFERENCES backends (id) ON DELETE CASCADE,
    model TEXT NOT NULL,
    hour BIGINT NOT NULL,
    requests BIGINT NOT NULL DEFAULT 0,
    errors BIGINT NOT NULL DEFAULT 0,
    prompt_tokens BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    cost DOUBLE NOT NULL DEFAULT 0,
    latency_ms_sum DOUBLE NOT NULL DEFAULT 0,
    PRIMARY KEY (backend_id, model, hour)
);
CREATE INDEX backend_usage_logs_hour ON backend_usage_logs (hour);

CREATE TABLE cooldown_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    backend_id INTEGER NOT NULL REFERENCES backends (id) ON DELETE CASCADE,
    started_at BIGINT NOT NULL,
    until BIGINT NOT NULL,
    ended_at BIGINT,
    consecutive_429 INTEGER NOT NULL,
    retry_after_ms BIGINT,
    reason TEXT NOT NULL
);
CREATE INDEX cooldown_events_started ON cooldown_events (started_at);

CREATE TABLE backend_health (
    backend_id INTEGER PRIMARY KEY NOT NULL REFERENCES backends (id) ON DELETE CASCADE,
    status TEXT NOT NULL,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    effective_rpm INTEGER,
    latency_ms DOUBLE,
    last_error TEXT,
    updated_at BIGINT NOT NULL
);

-- Runtime-tunable settings and internal records (the encryption canary).
CREATE TABLE system_config (
    key TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- Rolled up from backend_usage_logs; kept after hourly rows expire.
CREATE TABLE daily_stats (
    day TEXT NOT NULL,
    backend_id INTEGER NOT NULL,
    model TEXT NOT NULL,
    requests BIGINT NOT NULL DEFAULT 0,
    errors BIGINT NOT NULL DEFAULT 0,
    prompt_tokens BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    cost DOUBLE NOT NULL DEFAULT 0,
    latency_ms_sum DOUBLE NOT NULL DEFAULT 0,
    PRIMARY KEY (day, backend_id, model)
);

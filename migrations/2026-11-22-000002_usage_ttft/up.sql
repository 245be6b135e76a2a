-- Time to first token and attempts, per hour and per day.
ALTER TABLE backend_usage_logs ADD COLUMN ttft_ms_sum DOUBLE NOT NULL DEFAULT 0;
ALTER TABLE backend_usage_logs ADD COLUMN ttft_count BIGINT NOT NULL DEFAULT 0;
ALTER TABLE backend_usage_logs ADD COLUMN attempts BIGINT NOT NULL DEFAULT 0;
ALTER TABLE daily_stats ADD COLUMN ttft_ms_sum DOUBLE NOT NULL DEFAULT 0;
ALTER TABLE daily_stats ADD COLUMN ttft_count BIGINT NOT NULL DEFAULT 0;

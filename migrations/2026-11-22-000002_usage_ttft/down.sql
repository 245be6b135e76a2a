ALTER TABLE daily_stats DROP COLUMN ttft_count;
ALTER TABLE daily_stats DROP COLUMN ttft_ms_sum;
ALTER TABLE backend_usage_logs DROP COLUMN attempts;
ALTER TABLE backend_usage_logs DROP COLUMN ttft_count;
ALTER TABLE backend_usage_logs DROP COLUMN ttft_ms_sum;

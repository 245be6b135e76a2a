DROP TABLE daily_stats;
DROP TABLE system_config;
DROP TABLE backend_health;
DROP TABLE cooldown_events;
DROP TABLE backend_usage_logs;
DROP TABLE backends;

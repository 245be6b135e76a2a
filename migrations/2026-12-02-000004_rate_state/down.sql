DROP TABLE rate_state;

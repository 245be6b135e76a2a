ALTER TABLE backends DROP COLUMN upstream_until;

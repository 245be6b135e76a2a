-- Which upstream account holds each object created through the gateway (a
-- stored response, a stored chat completion): retrieve, update, delete,
-- cancel and previous_response_id must reach that account's key. Keyed by
-- the account (a hash of upstream and key), not the backend row, so it
-- survives a key being removed and added again. Pruned past the retention.
CREATE TABLE affinity (
    object_id TEXT PRIMARY KEY NOT NULL,
    account TEXT NOT NULL,
    -- The client key that created it; only that client may reach it.
    client TEXT,
    created_at BIGINT NOT NULL
);
CREATE INDEX affinity_created_at ON affinity (created_at);

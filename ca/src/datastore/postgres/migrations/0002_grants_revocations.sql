-- Token exchange (issue 14): grants and revocations. Each server reads them into
-- memory (at most 10,000 of each, bounded by the writers) and re-reads them every few
-- seconds, so no index beyond the keys is needed.

CREATE TABLE ztid_grants (
    id text COLLATE "C" PRIMARY KEY,
    record jsonb NOT NULL
);

-- Keyed by kind and target ("<kind>\n<target>"): revoking the same target again
-- replaces the record.
CREATE TABLE ztid_revocations (
    key text COLLATE "C" PRIMARY KEY,
    expires_at bigint NOT NULL,
    record jsonb NOT NULL
);

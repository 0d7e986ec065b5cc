-- ztid datastore schema, version 1 (applied by ztid-server at start, see schema.rs).
--
-- Every text key uses the "C" collation: byte order, which is the order pages are listed
-- in (the same as the sled store's), and cheap to compare. Records are the JSON the sled
-- store keeps, as jsonb so operators can read them; the columns beside them are what
-- the queries select on.

-- The entry revision counter: one row. Every entry write draws its revision(s) here,
-- inside its own transaction (see PgStore::draw_revisions for why that never lets a
-- reader miss a change).
CREATE TABLE ztid_revision (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    value bigint NOT NULL CHECK (value >= 0)
);
INSERT INTO ztid_revision (singleton, value) VALUES (true, 0);

-- Other cluster-wide counters: the number of entries (kept by the entry writes, which
-- are serialized by the revision row anyway) and the bundle sequence.
CREATE TABLE ztid_counters (
    name text COLLATE "C" PRIMARY KEY,
    value bigint NOT NULL
);
INSERT INTO ztid_counters (name, value) VALUES ('entries', 0), ('bundle_sequence', 0);

CREATE TABLE ztid_entries (
    id text COLLATE "C" PRIMARY KEY,
    spiffe_id text COLLATE "C" NOT NULL,
    parent_id text COLLATE "C" NOT NULL,
    node boolean NOT NULL,
    -- SHA-256 over SPIFFE ID, parent, kind and sorted selectors: create_entry's rule.
    identity bytea NOT NULL,
    revision bigint NOT NULL,
    record jsonb NOT NULL
);
CREATE UNIQUE INDEX ztid_entries_identity ON ztid_entries (identity);
CREATE INDEX ztid_entries_spiffe_id ON ztid_entries (spiffe_id, id);
CREATE INDEX ztid_entries_parent_id ON ztid_entries (parent_id, id);
CREATE INDEX ztid_entries_node ON ztid_entries (id) WHERE node;

-- The entry change log: one row per change, keyed by its revision.
CREATE TABLE ztid_entry_changes (
    revision bigint PRIMARY KEY,
    entry_id text COLLATE "C" NOT NULL,
    parent_id text COLLATE "C" NOT NULL,
    node boolean NOT NULL,
    deleted boolean NOT NULL
);
CREATE INDEX ztid_entry_changes_parent ON ztid_entry_changes (parent_id, revision);

CREATE TABLE ztid_agents (
    spiffe_id text COLLATE "C" PRIMARY KEY,
    banned boolean NOT NULL,
    serial text NOT NULL,
    record jsonb NOT NULL
);

CREATE TABLE ztid_join_tokens (
    hash bytea PRIMARY KEY CHECK (length(hash) = 32),
    expires_at bigint NOT NULL,
    record jsonb NOT NULL
);

-- Each server's own CA state (its X.509 and JWT authorities).
CREATE TABLE ztid_ca_states (
    server_id text COLLATE "C" PRIMARY KEY,
    state jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Each server's audit anchor (its own hash-chained log).
CREATE TABLE ztid_audit_anchors (
    server_id text COLLATE "C" PRIMARY KEY,
    seq bigint NOT NULL,
    record bytea NOT NULL
);

CREATE TABLE ztid_federated_bundles (
    trust_domain text COLLATE "C" PRIMARY KEY,
    record bytea NOT NULL
);

CREATE TABLE ztid_federations (
    trust_domain text COLLATE "C" PRIMARY KEY,
    record bytea NOT NULL
);

-- Hardware identifiers recorded with agent bans (`tpm:ek-hash:<hex>`,
-- `sev-snp:chip-id:<hex>`): a node proving one again is refused as banned, under
-- whatever agent ID it attests. Keyed by identifier and agent (read by identifier at
-- each attestation); removed by agent when its ban is lifted (`agent evict`). At most
-- 100,000 rows, bounded by the writers.
CREATE TABLE ztid_hardware_bans (
    identifier text COLLATE "C" NOT NULL,
    agent text COLLATE "C" NOT NULL,
    banned_at bigint NOT NULL,
    PRIMARY KEY (identifier, agent)
);
CREATE INDEX ztid_hardware_bans_by_agent ON ztid_hardware_bans (agent);

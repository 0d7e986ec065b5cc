-- Admin credential revocations (`ztid-server admin credential revoke`), apart from the
-- kill switch's: bounded on their own (an operator filling ztid_revocations cannot keep
-- an admin's stolen credential from being revoked), and never met by a server of an
-- earlier version, which reads ztid_revocations only and knows no kind "admin".
CREATE TABLE ztid_admin_revocations (
    key text COLLATE "C" PRIMARY KEY,
    expires_at bigint NOT NULL,
    record jsonb NOT NULL
);

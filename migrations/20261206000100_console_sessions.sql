-- Web console sessions (docs/console.md). One row per signed-in browser:
-- the SHA-256 of its random cookie token (the token itself is never
-- stored), the API key it signed in with (NULL: development mode without
-- auth), the tenant it acts for and its CSRF token. Any node serves any
-- session; a session ends after 12 hours idle, on sign-out, or when its key
-- is revoked (checked on every request against api_keys).
CREATE TABLE console_sessions (
    token_hash  bytea       PRIMARY KEY,
    key_id      uuid        REFERENCES api_keys (id) ON DELETE CASCADE,
    tenant_id   text,
    csrf_token  text        NOT NULL,
    create_time timestamptz NOT NULL,
    seen_time   timestamptz NOT NULL
);
CREATE INDEX console_sessions_seen ON console_sessions (seen_time);

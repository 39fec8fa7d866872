-- Misfire policy per definition (SPEC §3) and a binding's effective window.
ALTER TABLE definitions
    ADD COLUMN misfire_policy jsonb NOT NULL DEFAULT '{"catchup_window_secs": 60, "mode": "run_once"}';
ALTER TABLE bindings
    ADD COLUMN effective_from  timestamptz,
    ADD COLUMN effective_until timestamptz;

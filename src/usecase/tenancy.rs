//! Tenancy: API keys, quotas, the audit log.

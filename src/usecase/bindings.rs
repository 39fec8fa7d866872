//! Bindings: a tenant's use of a definition with its own schedule and
//! params.

use uuid::Uuid;

use super::{Core, Error, Result, Target};
use crate::db;
use crate::domain::Binding;

/// Binding `binding_id` of `tenant_id`.
///
/// # Errors
/// `NotFound` (also for another tenant's binding), database errors.
pub async fn get(core: &Core, tenant_id: &str, binding_id: Uuid) -> Result<Binding> {
    db::bindings::binding_get(&core.pool, tenant_id, binding_id)
        .await
        .map_err(Error::on(&Target::new("binding", binding_id)))
}

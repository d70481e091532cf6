//! `POST /v1/upgrade`: the admin API's door to [`crate::background::upgrade`].

use std::sync::Arc;

use http::{Response, StatusCode};

use super::{json, json_error, AdminBody};
use crate::background::upgrade::Upgrader;

/// `POST /v1/upgrade`: 200 with the new process's pid once it serves; 409 while another
/// upgrade is under way (or after this process handed over); 500 naming why the new process
/// did not take over (this one serves on).
pub(super) async fn answer(upgrader: &Arc<Upgrader>) -> Response<AdminBody> {
    use crate::background::upgrade::UpgradeError;
    match upgrader.upgrade().await {
        Ok(pid) => json(
            StatusCode::OK,
            &serde_json::json!({ "result": "ok", "pid": pid }),
        ),
        Err(e @ (UpgradeError::Busy | UpgradeError::HandedOver(_))) => {
            json_error(StatusCode::CONFLICT, &e.to_string())
        }
        Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

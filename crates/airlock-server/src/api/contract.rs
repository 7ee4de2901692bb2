//! What the OpenAPI document promises beyond each route's own annotation, derived from the route's shape so it cannot drift from the extractors that produce it.
//!
//! - Statuses: every route can answer 408 (the request deadline, `crate::https`); a route with bearer security can answer 401 (authentication failed, [`super::access`]), 403 (the decision refused), 429 (too many failed authentications, with `Retry-After`) and 503 (the store failed while checking the token); a JSON body ([`super::ApiJson`]) 400, 413 and 415; a path or query parameter 400 (it does not parse); a path id 404 (not in your tenant).
//!   A route's own annotation lists what only its handler decides (201, 409, 500, …); every error has the [`super::ErrorBody`] schema, and a 401 the `WWW-Authenticate` header.
//! - Parameters: each id parameter carries the exact pattern its type parses (`airlock_core::id`), so a client can tell a malformed id (400) from an unknown one (404); `state` lists the operation states.
//! - Schemas: a schema only responses use is closed (`additionalProperties: false`), since the server sends exactly its fields; one a request body reaches is closed where serde refuses unknown fields (`deny_unknown_fields`, which utoipa reads).

use std::collections::{BTreeMap, BTreeSet};

use airlock_core::operation::OperationState;
use airlock_core::{ApplianceId, EnvironmentId, OperationId, WorkspaceId};
use utoipa::openapi::path::{Operation, Parameter, ParameterIn, PathItem};
use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, Schema, SchemaType, Type};
use utoipa::openapi::{ContentBuilder, HeaderBuilder, OpenApi, Ref, RefOr, Response, ResponseBuilder};

/// The media type of every JSON body, request or response.
const JSON: &str = "application/json";

/// Completes `doc` as the module docs say.
pub(super) fn complete(doc: &mut OpenApi) {
    let mut request_schemas = Vec::new();
    for item in doc.paths.paths.values_mut() {
        for op in operations_mut(item) {
            for status in implied_statuses(op) {
                op.responses.responses.entry(status.to_string()).or_insert_with(|| RefOr::T(error_response(status)));
            }
            for param in op.parameters.iter_mut().flatten() {
                if let Some(schema) = parameter_schema(param) {
                    param.schema = Some(RefOr::T(schema));
                }
            }
            if let Some(RefOr::T(unauthorized)) = op.responses.responses.get_mut("401") {
                let header = HeaderBuilder::new()
                    .schema(ObjectBuilder::new().schema_type(Type::String).enum_values(Some(["Bearer"])))
                    .description(Some("always `Bearer`"))
                    .build();
                unauthorized.headers.insert("WWW-Authenticate".to_owned(), header);
            }
            let bodies = op.request_body.iter().flat_map(|b| b.content.values());
            request_schemas.extend(bodies.filter_map(|c| match &c.schema {
                Some(RefOr::Ref(r)) => Some(r.ref_location.clone()),
                _ => None,
            }));
        }
    }
    let Some(components) = doc.components.as_mut() else { return };
    let requests = reachable(&components.schemas, request_schemas);
    for (_, schema) in components.schemas.iter_mut().filter(|(name, _)| !requests.contains(*name)) {
        if let RefOr::T(Schema::Object(obj)) = schema
            && obj.schema_type == SchemaType::Type(Type::Object)
        {
            obj.additional_properties = Some(Box::new(AdditionalProperties::FreeForm(false)));
        }
    }
}

/// The names of the component schemas `roots` refer to, directly or through other components.
fn reachable(schemas: &BTreeMap<String, RefOr<Schema>>, roots: Vec<String>) -> BTreeSet<String> {
    let name_of = |location: &str| location.rsplit('/').next().unwrap_or_default().to_owned();
    let mut seen = BTreeSet::new();
    let mut todo: Vec<String> = roots.iter().map(|r| name_of(r)).collect();
    while let Some(name) = todo.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        let mut refs = Vec::new();
        collect_refs(&serde_json::to_value(schemas.get(&name)).unwrap_or_default(), &mut refs);
        todo.extend(refs.iter().map(|r| name_of(r)));
    }
    seen
}

fn collect_refs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::String(r)) = map.get("$ref") {
                out.push(r.clone());
            }
            map.values().for_each(|v| collect_refs(v, out));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

/// Every operation of a path, whatever its method.
pub(super) fn operations_mut(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.options,
        &mut item.head,
        &mut item.patch,
        &mut item.trace,
    ]
    .into_iter()
    .flatten()
}

/// The error statuses the operation's extractors can answer, from its shape.
fn implied_statuses(op: &Operation) -> Vec<u16> {
    // Any request not received and answered within the request deadline (`crate::https`).
    let mut statuses = vec![408];
    if op.security.as_ref().is_some_and(|s| !s.is_empty()) {
        statuses.extend([401, 403, 429, 503]);
    }
    if op.request_body.is_some() {
        statuses.extend([400, 413, 415]);
    }
    let params = op.parameters.iter().flatten();
    if params.clone().next().is_some() {
        statuses.push(400);
    }
    if params.clone().any(|p| p.parameter_in == ParameterIn::Path) {
        statuses.push(404);
    }
    statuses
}

fn error_response(status: u16) -> Response {
    let description = match status {
        400 => "malformed request: a path id, query or body the server cannot parse, or refuses",
        401 => "no valid bearer token",
        403 => "this token may not do this",
        404 => "no such resource in your tenant",
        413 => "the request body is too large",
        429 => {
            "too many failed authentications from this address or with this token; retry after `Retry-After` seconds"
        }
        415 => "the request body is not `application/json`",
        408 => "the request was not received and answered within the server's request deadline",
        500 => "the server failed",
        503 => "the store is unavailable; retry later",
        _ => "error",
    };
    ResponseBuilder::new()
        .description(description)
        .content(JSON, ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build())
        .build()
}

/// The exact schema of a parameter the server parses into a type, by its name; `None` leaves
/// the annotation's schema.
fn parameter_schema(param: &Parameter) -> Option<Schema> {
    let string = ObjectBuilder::new().schema_type(Type::String);
    let pattern = match (param.parameter_in.clone(), param.name.as_str()) {
        (ParameterIn::Path | ParameterIn::Query, "workspace") => WorkspaceId::PATTERN,
        (ParameterIn::Path | ParameterIn::Query, "environment") => EnvironmentId::PATTERN,
        (ParameterIn::Path, "appliance") => ApplianceId::PATTERN,
        (ParameterIn::Path, "id") => OperationId::PATTERN,
        (ParameterIn::Path, "rollout") => airlock_core::RolloutId::PATTERN,
        (ParameterIn::Path, "token") => airlock_core::id::TokenId::PATTERN,
        (ParameterIn::Path, "rule") => airlock_core::id::JoinRuleId::PATTERN,
        (ParameterIn::Path, "mapping") => airlock_core::id::RoleMappingId::PATTERN,
        // An identity provider's subject: any printable text (`sso::sessions`).
        (ParameterIn::Path, "subject") => r"^[^\x00-\x1f\x7f]{1,255}$",
        (ParameterIn::Query, "tenant") => airlock_core::TenantId::PATTERN,
        (ParameterIn::Path, "sha256" | "key_id") => "^[0-9a-f]{64}$",
        (ParameterIn::Query, "state") => {
            return Some(string.enum_values(Some(OperationState::ALL.map(OperationState::as_str))).build().into());
        }
        _ => return None,
    };
    Some(string.pattern(Some(pattern)).build().into())
}

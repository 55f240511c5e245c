//! The OpenAPI 3.1 document of the controller's HTTP API, written out by hand: the Ferma calls'
//! shapes are fixed by an external contract (reference/ferma-api.md) and the native calls are
//! few, so a derive framework would add more build weight than it saves. A test checks that
//! every route the routers serve is described here, so the document cannot silently fall behind.

use serde_json::{json, Value};

fn ferma_call(summary: &str, request: Value, data: Value) -> Value {
    json!({
        "post": {
            "tags": ["Ferma"],
            "summary": summary,
            "parameters": [{"name": "AuthToken", "in": "query", "required": true, "schema": {"type": "string"}}],
            "requestBody": {"required": true, "content": {"application/json": {"schema": request}}},
            "responses": {
                "200": {"description": "Success envelope", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["Status", "Data"],
                    "properties": {"Status": {"const": "Success"}, "Data": data}}}}},
                "default": {"$ref": "#/components/responses/Failed"}
            }
        }
    })
}

fn admin_get(summary: &str) -> Value {
    json!({"get": {"tags": ["Operator"], "summary": summary, "security": [{"admin": []}],
        "responses": {"200": {"description": "JSON array"}, "401": {"description": "wrong admin credential"}}}})
}

/// The document served at `/openapi.json`.
pub fn document() -> Value {
    let mut paths = serde_json::Map::new();
    paths.insert("/api/Authorization/CreateAuthToken".into(), json!({
        "post": {
            "tags": ["Ferma"],
            "summary": "Log in; the token goes into ?AuthToken= of every other Ferma call",
            "requestBody": {"required": true, "content": {"application/json": {"schema": {
                "type": "object", "required": ["Login", "Password"],
                "properties": {"Login": {"type": "string"}, "Password": {"type": "string"}}}}}},
            "responses": {
                "200": {"description": "Success envelope with Data {AuthToken, ExpirationDateUtc}"},
                "default": {"$ref": "#/components/responses/Failed"}
            }
        }
    }));
    paths.insert("/api/kkt/cloud/receipt".into(), ferma_call(
        "Create a receipt or a correction; answered after it is durable. A repeated InvoiceId answers 1019 with the first ReceiptId between double dashes; a full queue answers 503 with Retry-After.",
        json!({"$ref": "#/components/schemas/ReceiptRequest"}),
        json!({"type": "object", "properties": {"ReceiptId": {"type": "string", "format": "uuid"}}}),
    ));
    paths.insert(
        "/api/kkt/cloud/status".into(),
        ferma_call(
            "Status of one receipt by ReceiptId or InvoiceId",
            json!({"type": "object", "properties": {"Request": {"type": "object", "properties": {
            "ReceiptId": {"type": "string"}, "InvoiceId": {"type": "string"}}}}}),
            json!({"$ref": "#/components/schemas/StatusData"}),
        ),
    );
    let list_request = json!({"type": "object", "properties": {"Request": {"type": "object", "properties": {
        "ReceiptId": {"type": "string"},
        "StartDateUtc": {"type": "string", "example": "2026-12-04T00:00:00"},
        "EndDateUtc": {"type": "string"},
        "StartDateLocal": {"type": "string"},
        "EndDateLocal": {"type": "string"}}}}});
    paths.insert(
        "/api/kkt/cloud/list".into(),
        ferma_call(
            "Registry by acceptance time (at most 10,000 items)",
            list_request.clone(),
            json!({"type": "array", "items": {"$ref": "#/components/schemas/RegistryItem"}}),
        ),
    );
    paths.insert(
        "/api/kkt/cloud/list2".into(),
        ferma_call(
            "Registry by receipt (document) time (at most 10,000 items)",
            list_request,
            json!({"type": "array", "items": {"$ref": "#/components/schemas/RegistryItem"}}),
        ),
    );
    paths.insert("/v1/receipts/{id}".into(), json!({"get": {"tags": ["Native"],
        "summary": "A receipt with its job state, holder, attempts and history",
        "security": [{"session": []}],
        "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}],
        "responses": {"200": {"description": "NativeReceipt"}, "404": {"description": "not in this account"}}}}));
    paths.insert("/v1/kkts".into(), json!({"get": {"tags": ["Native"],
        "summary": "The account's registers: pool state, shift, FN headroom, unsent documents and the oldest one's age",
        "security": [{"session": []}],
        "responses": {"200": {"description": "array of NativeKkt"}}}}));
    paths.insert(
        "/metrics".into(),
        json!({"get": {"tags": ["Operator"], "summary": "Prometheus metrics (they name every organisation and register: admin credential required)",
        "security": [{"admin": []}],
        "responses": {"200": {"description": "text exposition format"}, "401": {"description": "wrong admin credential"}}}}),
    );
    paths.insert(
        "/openapi.json".into(),
        json!({"get": {"tags": ["Operator"], "summary": "This document",
        "responses": {"200": {"description": "OpenAPI 3.1"}}}}),
    );
    paths.insert("/admin/agent-tokens".into(), json!({"post": {"tags": ["Operator"],
        "summary": "One-time enrollment token for an agent", "security": [{"admin": []}],
        "requestBody": {"content": {"application/json": {"schema": {"type": "object", "properties": {"ttlSeconds": {"type": "integer"}}}}}},
        "responses": {"201": {"description": "{token, expiresAt}"}}}}));
    let mut accounts = admin_get("Accounts (never their password hashes)");
    accounts["post"] = json!({"tags": ["Operator"], "summary": "Create an account owning INNs",
        "security": [{"admin": []}],
        "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object",
            "required": ["login", "password", "inns"],
            "properties": {"login": {"type": "string"}, "password": {"type": "string"},
                "inns": {"type": "array", "items": {"type": "string"}}}}}}},
        "responses": {"201": {"description": "the account and its callback secret (shown once)"},
            "409": {"description": "login or INN taken"}}});
    paths.insert("/admin/accounts".into(), accounts);
    paths.insert(
        "/admin/kkts/{zn}/register".into(),
        json!({"post": {"tags": ["Operator"], "summary": "Register an online register (registration report): body is the registration card, RNM from the tax service",
        "security": [{"admin": []}],
        "parameters": [{"name": "zn", "in": "path", "required": true, "schema": {"type": "string"}}],
        "responses": {"200": {"description": "the registration report's fiscal result"}, "404": {"description": "register not online"}, "422": {"description": "the register refused (message says why)"}}}}),
    );
    paths.insert(
        "/admin/agents".into(),
        admin_get("Agents online, with RTT, journal and outbox depth"),
    );
    paths.insert(
        "/admin/kkts".into(),
        admin_get("Every online register with its pool state"),
    );
    paths.insert("/admin/queue".into(), admin_get("Receipts waiting per INN"));
    paths.insert(
        "/admin/jobs/in-doubt".into(),
        admin_get(
            "Jobs held by agents that have not reported them (?olderThanSeconds=N, default 60)",
        ),
    );
    paths.insert(
        "/admin/anomalies".into(),
        admin_get(
            "Broken promises recorded (a second document for one job, a result for an unknown job)",
        ),
    );

    json!({
        "openapi": "3.1.0",
        "info": {"title": "KKT cloud balancer controller", "version": env!("CARGO_PKG_VERSION"),
            "description": "Ferma-compatible receipt API, the native account API and operator calls."},
        "paths": Value::Object(paths),
        "components": {
            "securitySchemes": {
                "session": {"type": "http", "scheme": "bearer", "description": "the AuthToken from CreateAuthToken"},
                "admin": {"type": "http", "scheme": "bearer", "description": "the credential in <data>/admin.secret"}
            },
            "responses": {"Failed": {"description": "Failed envelope", "content": {"application/json": {"schema": {
                "type": "object", "required": ["Status", "Error"],
                "properties": {"Status": {"const": "Failed"}, "Error": {"type": "object",
                    "properties": {"Code": {"type": "integer", "description": "1000 bad request, 1001 token, 1002 login, 1010 validation, 1018 not found, 1019 InvoiceId used, 1020 INN not yours, 1030 queue full, 1500 internal"},
                        "Message": {"type": "string"}}}}}}}}},
            "schemas": schemas()
        }
    })
}
fn receipt_request() -> Value {
    json!({"type": "object", "required": ["Request"], "properties": {"Request": {"type": "object",
        "required": ["Inn", "Type", "InvoiceId", "CustomerReceipt"],
        "properties": {
            "Inn": {"type": "string"}, "Type": {"type": "string", "enum": ["Income", "IncomeReturn", "IncomePrepayment", "IncomeReturnPrepayment", "Expense", "ExpenseReturn", "IncomeCorrection", "IncomeReturnCorrection", "BuyCorrection", "ExpenseReturnCorrection"]},
            "InvoiceId": {"type": "string"}, "CallbackUrl": {"type": "string"}, "LocalDate": {"type": "string"},
            "CustomerReceipt": customer_receipt()}}}})
}

fn customer_receipt() -> Value {
    json!({"type": "object", "properties": {
        "TaxationSystem": {"type": "string"}, "Email": {"type": "string"}, "Phone": {"type": "string"},
        "Items": {"type": "array", "maxItems": 100, "items": {"type": "object",
            "required": ["Label", "Price", "Quantity", "Amount", "Vat"],
            "properties": {"Label": {"type": "string", "maxLength": 128}, "Price": {"type": "number"},
                "Quantity": {"type": "number"}, "Amount": {"type": "number"}, "Vat": {"type": "string"},
                "PaymentMethod": {"type": "integer"}, "PaymentType": {"type": "integer"}, "Measure": {"type": "string"}}}},
        "PaymentItems": {"type": "array", "items": {"type": "object", "properties": {"PaymentType": {"type": "integer"}, "Sum": {"type": "number"}}}}}})
}

fn status_data() -> Value {
    json!({"type": "object", "properties": {
        "ReceiptId": {"type": "string"}, "StatusCode": {"type": "integer", "enum": [0, 1, 2, 3]},
        "StatusName": {"type": "string", "enum": ["NEW", "PROCESSED", "CONFIRMED", "KKT_ERROR"]},
        "StatusMessage": {"type": "string"}, "ModifiedDateUtc": {"type": "string"}, "ReceiptDateUtc": {"type": "string"},
        "ModifiedDateTimeIso": {"type": "string"}, "ReceiptDateTimeIso": {"type": "string"},
        "Device": {"type": ["object", "null"], "properties": {"DeviceId": {"type": "integer"}, "RNM": {"type": "string"},
            "ZN": {"type": "string"}, "FN": {"type": "string"}, "FDN": {"type": "string"}, "FPD": {"type": "string"},
            "ShiftNumber": {"type": "integer"}, "ReceiptNumInShift": {"type": "integer"}, "DeviceType": {"type": "string"},
            "OfdReceiptUrl": {"type": "string"}}}}})
}

fn schemas() -> Value {
    json!({
        "ReceiptRequest": receipt_request(),
        "StatusData": status_data(),
        "RegistryItem": {"type": "object", "properties": {"ReceiptId": {"type": "string"}, "InvoiceId": {"type": "string"},
            "StatusCode": {"type": "integer"}, "StatusName": {"type": "string"},
            "Receipt": {"type": "object", "description": "the request as sent, with cashboxInfoHolder"}}}
    })
}

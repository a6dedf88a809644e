//! Contract tests of `mde-sim` against shared/mde-api.md: every rule of sections 2 to 6 is
//! exercised on the real binary through HTTP. Time is frozen (`--time-scale 0`) and moved with
//! the admin API wherever timing matters, so nothing depends on real elapsed time.

mod common;

use std::collections::BTreeSet;
use std::io::Write;

use common::sim::{CLIENT_ID, CLIENT_SECRET, Resp, SCOPE, Sim};
use serde_json::{Value, json};

const V2: &str = "/contoso.onmicrosoft.com/oauth2/v2.0/token";
const V1: &str = "/contoso.onmicrosoft.com/oauth2/token";

const M_ONLINE: &str = "1e5bc9d7e413ddd7902c2932e418702b84d0cc07";
const M_OFFLINE: &str = "2e5bc9d7e413ddd7902c2932e418702b84d0cc07";
const M_FAILING: &str = "3e5bc9d7e413ddd7902c2932e418702b84d0cc07";
const M_UNSUPPORTED: &str = "4e5bc9d7e413ddd7902c2932e418702b84d0cc07";
const M_ISOLATED: &str = "5e5bc9d7e413ddd7902c2932e418702b84d0cc07";
const M_SHORT: &str = "6e5bc9d7e413ddd7902c2932e418702b84d0cc07";
const M_SPARE: &str = "7e5bc9d7e413ddd7902c2932e418702b84d0cc07";

const SEED: &str = r#"
machines:
  - id: "1e5bc9d7e413ddd7902c2932e418702b84d0cc07"
    computerDnsName: ws-001.contoso.local
    osPlatform: Windows11
    machineTags: [finance, vip]
    behaviour: online
  - id: "2e5bc9d7e413ddd7902c2932e418702b84d0cc07"
    computerDnsName: ws-002.contoso.local
    behaviour: offline
  - id: "3e5bc9d7e413ddd7902c2932e418702b84d0cc07"
    computerDnsName: ws-003.contoso.local
    behaviour: failing
  - id: "4e5bc9d7e413ddd7902c2932e418702b84d0cc07"
    computerDnsName: legacy.contoso.local
    osPlatform: WindowsXP
    behaviour: unsupported
  - id: "5e5bc9d7e413ddd7902c2932e418702b84d0cc07"
    computerDnsName: ws-005.contoso.local
    machineTags: [finance]
    isolated: true
  - id: "6e5bc9d7e413ddd7902c2932e418702b84d0cc07"
    computerDnsName: ws-001
  - id: "7e5bc9d7e413ddd7902c2932e418702b84d0cc07"
    computerDnsName: ws-007.contoso.local
"#;

/// Writes a seed file that lives as long as the returned handle.
fn seed_file(yaml: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(yaml.as_bytes()).expect("write seed");
    f
}

/// Starts a simulator with a frozen clock (unless the args set one).
fn frozen(args: &[&str]) -> Sim {
    let mut all: Vec<&str> = args.to_vec();
    if !all.contains(&"--time-scale") {
        all.extend(["--time-scale", "0"]);
    }
    Sim::start(&all)
}

/// A frozen simulator with one machine and two apps (`app-a`, `app-b`, reading machines), each
/// with `per_minute` calls a minute per API; their tokens.
async fn two_apps(per_minute: &str) -> (Sim, tempfile::NamedTempFile, String, String) {
    let f = seed_file(
        r#"
machines:
  - computerDnsName: a.contoso.local
apps:
  - clientId: app-a
    clientSecret: a
    roles: [Machine.Read.All]
  - clientId: app-b
    clientSecret: b
    roles: [Machine.Read.All]
"#,
    );
    let sim = frozen(&[
        "--seed",
        f.path().to_str().unwrap(),
        "--quota-per-minute",
        per_minute,
    ]);
    let a = sim.token_for("app-a", "a", SCOPE).await;
    let b = sim.token_for("app-b", "b", SCOPE).await;
    (sim, f, a, b)
}

/// A frozen simulator with the seed machines.
fn seeded(args: &[&str]) -> (Sim, tempfile::NamedTempFile) {
    let f = seed_file(SEED);
    let path = f.path().to_str().expect("utf8 path").to_string();
    let mut all = vec!["--seed", path.as_str()];
    all.extend_from_slice(args);
    (frozen(&all), f)
}

fn is_guid(s: &str) -> bool {
    s.len() == 36
        && s.chars().enumerate().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

/// `2026-01-02T03:04:05.1234567Z`.
fn is_ts7(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() == 28
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'.'
        && b[27] == b'Z'
        && s.chars()
            .enumerate()
            .all(|(i, c)| [4, 7, 10, 13, 16, 19, 27].contains(&i) || c.is_ascii_digit())
}

/// Asserts an MDE error: status, code, the exact body shape, a fresh GUID target and the
/// OData headers.
fn assert_error(r: &Resp, status: u16, code: &str) {
    assert_eq!(r.status, status, "body {:?}", r.body);
    assert_eq!(r.code(), code, "body {:?}", r.body);
    let obj = r.body.as_object().expect("object");
    assert_eq!(obj.len(), 1, "only `error` at the top: {:?}", r.body);
    let err = r.body["error"].as_object().expect("error object");
    let keys: BTreeSet<&str> = err.keys().map(String::as_str).collect();
    assert_eq!(keys, BTreeSet::from(["code", "message", "target"]));
    assert!(!err["message"].as_str().unwrap_or("").is_empty());
    assert!(
        is_guid(err["target"].as_str().unwrap_or("")),
        "target {:?}",
        err["target"]
    );
    assert!(r.header("content-type").starts_with("application/json"));
}

fn ids(r: &Resp) -> BTreeSet<String> {
    assert_eq!(r.status, 200, "body {:?}", r.body);
    r.body["value"]
        .as_array()
        .expect("value")
        .iter()
        .map(|a| a["id"].as_str().expect("id").to_string())
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

async fn isolate(sim: &Sim, tok: &str, machine: &str) -> Resp {
    sim.post(
        &format!("/api/machines/{machine}/isolate"),
        tok,
        json!({"Comment": "test isolate", "IsolationType": "Full"}),
    )
    .await
}

async fn unisolate(sim: &Sim, tok: &str, machine: &str) -> Resp {
    sim.post(
        &format!("/api/machines/{machine}/unisolate"),
        tok,
        json!({"Comment": "test release"}),
    )
    .await
}

async fn action_status(sim: &Sim, tok: &str, id: &str) -> String {
    let r = sim.get(&format!("/api/machineactions/{id}"), tok).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body["status"].as_str().expect("status").to_string()
}

fn action_id(r: &Resp) -> String {
    assert_eq!(r.status, 201, "{:?}", r.body);
    r.body["id"].as_str().expect("id").to_string()
}

// ---------------------------------------------------------------- §2 authentication

#[tokio::test]
async fn token_v2_client_credentials() {
    let sim = frozen(&[]);
    let r = sim
        .token_request(
            V2,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", CLIENT_ID),
                ("client_secret", CLIENT_SECRET),
                ("scope", SCOPE),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").starts_with("application/json"));
    assert_eq!(r.body["token_type"], "Bearer");
    assert_eq!(r.body["expires_in"], 3599);
    assert!(r.body["access_token"].as_str().unwrap().len() > 20);
}

#[tokio::test]
async fn token_v1_post_and_get_with_form_body() {
    let sim = frozen(&["--machines", "1"]);
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", CLIENT_ID),
        ("client_secret", CLIENT_SECRET),
        ("resource", "https://api.securitycenter.microsoft.com"),
    ];
    let r = sim.token_request(V1, &form).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["token_type"], "Bearer");
    assert_eq!(r.body["expires_in"], 3599);
    assert_eq!(
        r.body["resource"],
        "https://api.securitycenter.microsoft.com"
    );
    let tok = r.body["access_token"].as_str().unwrap();
    assert_eq!(sim.get("/api/machines", tok).await.status, 200);

    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let g = sim
        .client
        .get(sim.url(V1))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    let g = Sim::into_resp(g).await;
    assert_eq!(g.status, 200, "{:?}", g.body);
    assert!(g.body["access_token"].is_string());
}

#[tokio::test]
async fn token_v1_numbers_as_strings_when_asked() {
    let sim = frozen(&["--v1-string-numbers"]);
    let r = sim
        .token_request(
            V1,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", CLIENT_ID),
                ("client_secret", CLIENT_SECRET),
                ("resource", "https://api.securitycenter.microsoft.com"),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["expires_in"], "3599");
}

#[tokio::test]
async fn token_errors_are_oauth_style() {
    let sim = frozen(&[]);
    let base = |secret: &'static str| {
        vec![
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
            ("client_secret", secret),
            ("scope", SCOPE),
        ]
    };
    let r = sim.token_request(V2, &base("wrong")).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.body["error"], "invalid_client");
    assert_eq!(r.body["error_codes"], json!([7000215]));
    assert!(
        r.body["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS7000215")
    );
    assert!(is_guid(r.body["trace_id"].as_str().unwrap()));

    let r = sim
        .token_request(
            V2,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", "nobody"),
                ("client_secret", "x"),
                ("scope", SCOPE),
            ],
        )
        .await;
    assert_eq!(
        (r.status, r.body["error"].as_str()),
        (400, Some("unauthorized_client"))
    );

    let r = sim
        .token_request(
            V2,
            &[
                ("client_id", CLIENT_ID),
                ("client_secret", CLIENT_SECRET),
                ("scope", SCOPE),
            ],
        )
        .await;
    assert_eq!(
        (r.status, r.body["error"].as_str()),
        (400, Some("invalid_request"))
    );

    let r = sim
        .token_request(
            V2,
            &[
                ("grant_type", "password"),
                ("client_id", CLIENT_ID),
                ("client_secret", CLIENT_SECRET),
                ("scope", SCOPE),
            ],
        )
        .await;
    assert_eq!(
        (r.status, r.body["error"].as_str()),
        (400, Some("unsupported_grant_type"))
    );

    let r = sim
        .token_request(
            V2,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", CLIENT_ID),
                ("client_secret", CLIENT_SECRET),
                ("scope", "https://api.securitycenter.microsoft.com"),
            ],
        )
        .await;
    assert_eq!(
        (r.status, r.body["error"].as_str()),
        (400, Some("invalid_scope"))
    );

    let r = sim
        .token_request(
            V2,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", CLIENT_ID),
                ("scope", SCOPE),
            ],
        )
        .await;
    assert_eq!(
        (r.status, r.body["error"].as_str()),
        (401, Some("invalid_client"))
    );

    let r = sim
        .token_request(
            V1,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", CLIENT_ID),
                ("client_secret", CLIENT_SECRET),
            ],
        )
        .await;
    assert_eq!(
        (r.status, r.body["error"].as_str()),
        (400, Some("invalid_request"))
    );
}

fn b64url(data: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test]
async fn token_with_client_assertion() {
    let sim = frozen(&["--machines", "1"]);
    let jwt = |iss: &str| {
        format!(
            "{}.{}.{}",
            b64url(br#"{"alg":"RS256","typ":"JWT"}"#),
            b64url(
                json!({"iss": iss, "sub": iss, "aud": "x", "exp": 4102444800u64, "jti": "1"})
                    .to_string()
                    .as_bytes()
            ),
            b64url(b"signature")
        )
    };
    let good = jwt(CLIENT_ID);
    let form = |a: &str| {
        vec![
            ("grant_type", "client_credentials".to_string()),
            ("client_id", CLIENT_ID.to_string()),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".to_string(),
            ),
            ("client_assertion", a.to_string()),
            ("scope", SCOPE.to_string()),
        ]
    };
    let f = form(&good);
    let pairs: Vec<(&str, &str)> = f.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = sim.token_request(V2, &pairs).await;
    assert_eq!(r.status, 200, "{:?}", r.body);

    let f = form(&jwt("someone-else"));
    let pairs: Vec<(&str, &str)> = f.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = sim.token_request(V2, &pairs).await;
    assert_eq!(
        (r.status, r.body["error"].as_str()),
        (401, Some("invalid_client"))
    );

    let f = form("not-a-jwt");
    let pairs: Vec<(&str, &str)> = f.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(sim.token_request(V2, &pairs).await.status, 400);
}

#[tokio::test]
async fn api_answers_401_for_missing_unknown_and_expired_tokens() {
    let sim = frozen(&["--machines", "1", "--token-lifetime", "60"]);
    let r = sim.send("GET", "/api/machines", None, None).await;
    assert_error(&r, 401, "Unauthorized");
    assert_eq!(r.header("www-authenticate"), "Bearer");
    assert_error(
        &sim.get("/api/machines", "made-up-token").await,
        401,
        "Unauthorized",
    );

    let r = sim
        .token_request(
            V2,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", CLIENT_ID),
                ("client_secret", CLIENT_SECRET),
                ("scope", SCOPE),
            ],
        )
        .await;
    assert_eq!(r.body["expires_in"], 60);
    let tok = r.body["access_token"].as_str().unwrap().to_string();
    sim.advance(59.0).await;
    assert_eq!(sim.get("/api/machines", &tok).await.status, 200);
    sim.advance(1.0).await;
    assert_error(&sim.get("/api/machines", &tok).await, 401, "Unauthorized");
    // A fresh token works again.
    let fresh = sim.token().await;
    assert_eq!(sim.get("/api/machines", &fresh).await.status, 200);
}

#[tokio::test]
async fn wrong_audience_is_403_not_401() {
    let sim = frozen(&["--machines", "1"]);
    let graph = sim
        .token_for(
            CLIENT_ID,
            CLIENT_SECRET,
            "https://graph.microsoft.com/.default",
        )
        .await;
    assert_error(&sim.get("/api/machines", &graph).await, 403, "Forbidden");
    let id = sim.machine_ids().await.remove(0);
    assert_error(&unisolate(&sim, &graph, &id).await, 403, "Forbidden");
    let alt = sim
        .token_for(
            CLIENT_ID,
            CLIENT_SECRET,
            "https://api.security.microsoft.com/.default",
        )
        .await;
    assert_eq!(sim.get("/api/machines", &alt).await.status, 200);
}

#[tokio::test]
async fn audience_is_configurable() {
    let sim = frozen(&[
        "--machines",
        "1",
        "--audience",
        "https://api-gcc.securitycenter.microsoft.us",
    ]);
    let gcc = sim
        .token_for(
            CLIENT_ID,
            CLIENT_SECRET,
            "https://api-gcc.securitycenter.microsoft.us/.default",
        )
        .await;
    assert_eq!(sim.get("/api/machines", &gcc).await.status, 200);
    let commercial = sim.token().await;
    assert_error(
        &sim.get("/api/machines", &commercial).await,
        403,
        "Forbidden",
    );
}

#[tokio::test]
async fn roles_gate_reads_and_isolation() {
    let sim = frozen(&["--machines", "2", "--app-roles", "Machine.Isolate"]);
    let tok = sim.token().await;
    let ids = sim.machine_ids().await;
    assert_error(&sim.get("/api/machines", &tok).await, 403, "Forbidden");
    assert_error(
        &sim.get("/api/machineactions", &tok).await,
        403,
        "Forbidden",
    );
    let r = isolate(&sim, &tok, &ids[0]).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_error(
        &sim.get(&format!("/api/machineactions/{}", action_id(&r)), &tok)
            .await,
        403,
        "Forbidden",
    );

    let sim = frozen(&["--machines", "1", "--app-roles", "Machine.Read.All"]);
    let tok = sim.token().await;
    let ids = sim.machine_ids().await;
    assert_eq!(sim.get("/api/machines", &tok).await.status, 200);
    assert_error(&isolate(&sim, &tok, &ids[0]).await, 403, "Forbidden");
    assert_error(
        &sim.post(
            "/api/machineactions/00000000-0000-0000-0000-000000000000/cancel",
            &tok,
            json!({"Comment": "x"}),
        )
        .await,
        403,
        "Forbidden",
    );

    let sim = frozen(&["--machines", "1", "--app-roles", "Machine.ReadWrite.All"]);
    let tok = sim.token().await;
    assert_eq!(sim.get("/api/machines", &tok).await.status, 200);
}

#[tokio::test]
async fn seeded_apps_have_their_own_roles_and_display_names() {
    let f = seed_file(
        r#"
machines:
  - computerDnsName: a.contoso.local
apps:
  - clientId: operator
    clientSecret: s1
    displayName: MDE Isolation Operator
    roles: [Machine.Isolate, Machine.Read.All]
  - clientId: reader
    clientSecret: s2
    roles: [Machine.Read.All]
"#,
    );
    let sim = frozen(&["--seed", f.path().to_str().unwrap()]);
    let op = sim.token_for("operator", "s1", SCOPE).await;
    let reader = sim.token_for("reader", "s2", SCOPE).await;
    let id = sim.machine_ids().await.remove(0);
    assert!(tenant_id_ok(&id));
    let r = isolate(&sim, &op, &id).await;
    assert_eq!(r.body["requestor"], "MDE Isolation Operator");
    assert_error(&unisolate(&sim, &reader, &id).await, 403, "Forbidden");
    // The default app does not exist when apps are seeded.
    let r = sim
        .token_request(
            V2,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", CLIENT_ID),
                ("client_secret", CLIENT_SECRET),
                ("scope", SCOPE),
            ],
        )
        .await;
    assert_eq!(r.status, 400);
}

fn tenant_id_ok(id: &str) -> bool {
    id.len() == 40
        && id
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
}

// ---------------------------------------------------------------- §3 isolate / release

#[tokio::test]
async fn isolate_answers_201_with_a_complete_machine_action() {
    let (sim, _f) = seeded(&[]);
    let tok = sim.token().await;
    let r = isolate(&sim, &tok, M_ONLINE).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(
        r.header("content-type"),
        "application/json; odata.metadata=minimal; odata.streaming=true; charset=utf-8"
    );
    assert_eq!(r.header("odata-version"), "4.0");
    let a = r.body.as_object().unwrap();
    for field in [
        "id",
        "type",
        "scope",
        "requestor",
        "requestorComment",
        "status",
        "machineId",
        "computerDnsName",
        "creationDateTimeUtc",
        "lastUpdateDateTimeUtc",
        "cancellationRequestor",
        "cancellationComment",
        "cancellationDateTimeUtc",
        "errorHResult",
        "externalId",
        "title",
        "relatedFileInfo",
        "commands",
        "troubleshootInfo",
        "requestSource",
    ] {
        assert!(a.contains_key(field), "missing {field}");
    }
    assert!(is_guid(a["id"].as_str().unwrap()));
    assert_eq!(a["type"], "Isolate");
    assert_eq!(a["status"], "Pending");
    assert_eq!(a["scope"], Value::Null);
    assert_eq!(a["requestor"], CLIENT_ID);
    assert_eq!(a["requestorComment"], "test isolate");
    assert_eq!(a["machineId"], M_ONLINE);
    assert_eq!(a["computerDnsName"], "ws-001.contoso.local");
    assert_eq!(a["requestSource"], "PublicApi");
    assert_eq!(a["errorHResult"], 0);
    assert_eq!(a["commands"], json!([]));
    assert_eq!(a["externalId"], Value::Null);
    assert_eq!(a["cancellationRequestor"], Value::Null);
    assert!(
        is_ts7(a["creationDateTimeUtc"].as_str().unwrap()),
        "{}",
        a["creationDateTimeUtc"]
    );
    assert!(is_ts7(a["lastUpdateDateTimeUtc"].as_str().unwrap()));
    // Unisolate the same way on another machine.
    let r = unisolate(&sim, &tok, M_ISOLATED).await;
    assert_eq!(r.status, 201);
    assert_eq!(r.body["type"], "Unisolate");
    assert_eq!(r.body["requestorComment"], "test release");
}

#[tokio::test]
async fn versioned_paths_behave_the_same() {
    let (sim, _f) = seeded(&[]);
    let tok = sim.token().await;
    let r = sim
        .post(
            &format!("/api/v1.0/machines/{M_ONLINE}/isolate"),
            &tok,
            json!({"Comment": "v1.0", "IsolationType": "Selective"}),
        )
        .await;
    let id = action_id(&r);
    assert_eq!(
        sim.get(&format!("/api/v1.0/machineactions/{id}"), &tok)
            .await
            .status,
        200
    );
    assert_eq!(
        sim.get(&format!("/api/v1.0/machines/{M_ONLINE}"), &tok)
            .await
            .status,
        200
    );
    assert_eq!(
        ids(&sim.get("/api/v1.0/machineactions", &tok).await),
        set(&[&id])
    );
    let r = sim.get("/api/v1.0/machines", &tok).await;
    assert_eq!(r.status, 200);
    assert!(
        r.body["@odata.context"]
            .as_str()
            .unwrap()
            .starts_with(&sim.base_url)
    );
}

#[tokio::test]
async fn body_property_names_are_case_sensitive() {
    let (sim, _f) = seeded(&[]);
    let tok = sim.token().await;
    let r = sim
        .post(
            &format!("/api/machines/{M_ONLINE}/unisolate"),
            &tok,
            json!({"comment": "lower case"}),
        )
        .await;
    assert_error(&r, 400, "MissingRequiredParameter");
    let r = sim
        .post(
            &format!("/api/machines/{M_ONLINE}/isolate"),
            &tok,
            json!({"Comment": "x", "IsolationType": "full"}),
        )
        .await;
    assert_error(&r, 400, "InvalidRequestBody");
    let r = sim
        .post(
            &format!("/api/machines/{M_ONLINE}/isolate"),
            &tok,
            json!({"Comment": ""}),
        )
        .await;
    assert_error(&r, 400, "MissingRequiredParameter");
    let r = sim
        .post(
            &format!("/api/machines/{M_ONLINE}/isolate"),
            &tok,
            json!({"Comment": 5}),
        )
        .await;
    assert_error(&r, 400, "InvalidRequestBody");
    // IsolationType is optional and defaults to Full.
    let r = sim
        .post(
            &format!("/api/machines/{M_ONLINE}/isolate"),
            &tok,
            json!({"Comment": "x"}),
        )
        .await;
    let id = action_id(&r);
    sim.advance(10.0).await;
    let g = sim.get(&format!("/api/machineactions/{id}"), &tok).await;
    assert_eq!(g.body["scope"], "Full");
    // Nothing was created by the rejected calls.
    assert_eq!(
        sim.ground_truth(M_ONLINE).await["actions"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn unknown_machine_is_404_on_get_and_post() {
    let (sim, _f) = seeded(&[]);
    let tok = sim.token().await;
    let unknown = "ffffffffffffffffffffffffffffffffffffffff";
    assert_error(&isolate(&sim, &tok, unknown).await, 404, "ResourceNotFound");
    assert_error(
        &unisolate(&sim, &tok, unknown).await,
        404,
        "ResourceNotFound",
    );
    assert_error(
        &sim.get(&format!("/api/machines/{unknown}"), &tok).await,
        404,
        "ResourceNotFound",
    );
    assert_error(
        &sim.get("/api/machines/not-an-id", &tok).await,
        404,
        "ResourceNotFound",
    );
}

#[tokio::test]
async fn unsupported_platform_is_400() {
    let (sim, _f) = seeded(&[]);
    let tok = sim.token().await;
    assert_error(
        &isolate(&sim, &tok, M_UNSUPPORTED).await,
        400,
        "OsPlatformNotSupported",
    );
    assert_error(
        &unisolate(&sim, &tok, M_UNSUPPORTED).await,
        400,
        "OsPlatformNotSupported",
    );
}

#[tokio::test]
async fn duplicate_reject_mode_answers_active_request_already_exists() {
    let (sim, _f) = seeded(&[]);
    let tok = sim.token().await;
    let first = action_id(&isolate(&sim, &tok, M_ONLINE).await);
    let r = isolate(&sim, &tok, M_ONLINE).await;
    assert_error(&r, 400, "ActiveRequestAlreadyExists");
    assert_eq!(r.body["error"]["message"], "Action is already in progress");
    assert_error(
        &unisolate(&sim, &tok, M_ONLINE).await,
        400,
        "ActiveRequestAlreadyExists",
    );
    // Still rejected while InProgress; accepted once the first one is final.
    sim.advance(10.0).await;
    assert_eq!(action_status(&sim, &tok, &first).await, "InProgress");
    assert_error(
        &unisolate(&sim, &tok, M_ONLINE).await,
        400,
        "ActiveRequestAlreadyExists",
    );
    sim.advance(50.0).await;
    assert_eq!(action_status(&sim, &tok, &first).await, "Succeeded");
    assert_eq!(unisolate(&sim, &tok, M_ONLINE).await.status, 201);
    assert_eq!(
        sim.ground_truth(M_ONLINE).await["actions"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test]
async fn duplicate_return_existing_mode_returns_the_open_action() {
    let (sim, _f) = seeded(&["--duplicate-mode", "return-existing"]);
    let tok = sim.token().await;
    let first = action_id(&isolate(&sim, &tok, M_OFFLINE).await);
    let again = isolate(&sim, &tok, M_OFFLINE).await;
    assert_eq!(again.status, 201);
    assert_eq!(again.body["id"], first.as_str());
    // The opposite request cannot reuse it.
    assert_error(
        &unisolate(&sim, &tok, M_OFFLINE).await,
        400,
        "ActiveRequestAlreadyExists",
    );
    assert_eq!(
        sim.ground_truth(M_OFFLINE).await["actions"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn allow_mode_shows_the_out_of_order_hazard() {
    let (sim, _f) = seeded(&["--duplicate-mode", "allow"]);
    let tok = sim.token().await;
    let iso = action_id(&isolate(&sim, &tok, M_ONLINE).await);
    let rel = action_id(&unisolate(&sim, &tok, M_ONLINE).await);
    let gt = sim.ground_truth(M_ONLINE).await;
    assert_eq!(gt["openActions"], 2);
    sim.advance(300.0).await;
    assert_eq!(action_status(&sim, &tok, &iso).await, "Succeeded");
    assert_eq!(action_status(&sim, &tok, &rel).await, "Succeeded");
    // The release was requested last, yet the device ends isolated: the isolate completed after it.
    let gt = sim.ground_truth(M_ONLINE).await;
    assert_eq!(gt["isolated"], true, "{gt}");
    assert_eq!(gt["lastChangeActionId"], iso.as_str());
    let a_iso = sim
        .get(&format!("/api/machineactions/{iso}"), &tok)
        .await
        .body;
    let a_rel = sim
        .get(&format!("/api/machineactions/{rel}"), &tok)
        .await
        .body;
    assert!(
        a_rel["lastUpdateDateTimeUtc"].as_str().unwrap()
            < a_iso["lastUpdateDateTimeUtc"].as_str().unwrap()
    );
}

#[tokio::test]
async fn allow_mode_with_fifo_order_ends_as_requested() {
    let (sim, _f) = seeded(&["--duplicate-mode", "allow", "--overlap-order", "fifo"]);
    let tok = sim.token().await;
    action_id(&isolate(&sim, &tok, M_ONLINE).await);
    let rel = action_id(&unisolate(&sim, &tok, M_ONLINE).await);
    sim.advance(300.0).await;
    let gt = sim.ground_truth(M_ONLINE).await;
    assert_eq!(gt["isolated"], false, "{gt}");
    assert_eq!(gt["lastChangeActionId"], rel.as_str());
}

// ---------------------------------------------------------------- §4 machine actions

#[tokio::test]
async fn online_lifecycle_changes_ground_truth() {
    let (sim, _f) = seeded(&[]);
    let tok = sim.token().await;
    let t0 = sim.now().await;
    let r = sim
        .post(
            &format!("/api/machines/{M_ONLINE}/isolate"),
            &tok,
            json!({"Comment": "go", "IsolationType": "Selective"}),
        )
        .await;
    let id = action_id(&r);
    assert_eq!(r.body["creationDateTimeUtc"], t0.as_str());
    sim.advance(9.0).await;
    assert_eq!(action_status(&sim, &tok, &id).await, "Pending");
    assert_eq!(sim.ground_truth(M_ONLINE).await["isolated"], false);
    sim.advance(1.0).await;
    let a = sim
        .get(&format!("/api/machineactions/{id}"), &tok)
        .await
        .body;
    assert_eq!(a["status"], "InProgress");
    assert_eq!(a["scope"], "Selective");
    assert!(
        a["lastUpdateDateTimeUtc"].as_str().unwrap() > a["creationDateTimeUtc"].as_str().unwrap()
    );
    sim.advance(50.0).await;
    assert_eq!(action_status(&sim, &tok, &id).await, "Succeeded");
    let gt = sim.ground_truth(M_ONLINE).await;
    assert_eq!(gt["isolated"], true);
    assert_eq!(gt["isolationType"], "Selective");
    // The machine entity never says whether it is isolated.
    let m = sim
        .get(&format!("/api/machines/{M_ONLINE}"), &tok)
        .await
        .body;
    assert!(m.get("isolated").is_none() && m.get("isolationState").is_none());

    let rel = action_id(&unisolate(&sim, &tok, M_ONLINE).await);
    sim.advance(60.0).await;
    assert_eq!(action_status(&sim, &tok, &rel).await, "Succeeded");
    assert_eq!(sim.ground_truth(M_ONLINE).await["isolated"], false);
}

#[tokio::test]
async fn offline_device_stays_pending_for_days_then_times_out() {
    // Tokens last an hour; this test spans days of simulated time.
    let (sim, _f) = seeded(&["--token-lifetime", "999999"]);
    let tok = sim.token().await;
    let id = action_id(&isolate(&sim, &tok, M_OFFLINE).await);
    sim.advance(2.0 * 86400.0).await;
    assert_eq!(action_status(&sim, &tok, &id).await, "Pending");
    sim.advance(86400.0 - 1.0).await;
    assert_eq!(action_status(&sim, &tok, &id).await, "Pending");
    sim.advance(1.0).await;
    assert_eq!(action_status(&sim, &tok, &id).await, "TimeOut");
    assert_eq!(sim.ground_truth(M_OFFLINE).await["isolated"], false);
}

#[tokio::test]
async fn failing_device_fails_the_action() {
    let (sim, _f) = seeded(&[]);
    let tok = sim.token().await;
    let id = action_id(&unisolate(&sim, &tok, M_FAILING).await);
    sim.advance(60.0).await;
    let a = sim
        .get(&format!("/api/machineactions/{id}"), &tok)
        .await
        .body;
    assert_eq!(a["status"], "Failed");
    assert_ne!(a["errorHResult"], 0);
    assert_eq!(sim.ground_truth(M_FAILING).await["isolated"], false);
}

#[tokio::test]
async fn initially_isolated_machine_is_released_by_unisolate() {
    let (sim, _f) = seeded(&[]);
    let tok = sim.token().await;
    assert_eq!(sim.ground_truth(M_ISOLATED).await["isolated"], true);
    let id = action_id(&unisolate(&sim, &tok, M_ISOLATED).await);
    sim.advance(60.0).await;
    assert_eq!(action_status(&sim, &tok, &id).await, "Succeeded");
    assert_eq!(
        sim.ground_truth("ws-005.contoso.local").await["isolated"],
        false
    );
}

#[tokio::test]
async fn lifecycle_runs_on_a_scaled_clock() {
    let sim = Sim::start(&["--machines", "1", "--time-scale", "100"]);
    let tok = sim.token().await;
    let m = sim.machine_ids().await.remove(0);
    let id = action_id(&isolate(&sim, &tok, &m).await);
    // 60 simulated seconds are 0.6 real seconds; allow a minute of real time on a busy machine.
    sim.wait_until(60, "action to succeed", || async {
        (action_status(&sim, &tok, &id).await == "Succeeded").then_some(())
    })
    .await;
    assert_eq!(sim.ground_truth(&m).await["isolated"], true);
}

#[tokio::test]
async fn get_action_is_200_or_404() {
    let (sim, _f) = seeded(&[]);
    let tok = sim.token().await;
    let id = action_id(&isolate(&sim, &tok, M_ONLINE).await);
    let r = sim.get(&format!("/api/machineactions/{id}"), &tok).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["id"], id.as_str());
    assert!(
        r.body["@odata.context"]
            .as_str()
            .unwrap()
            .ends_with("#MachineActions/$entity")
    );
    assert_error(
        &sim.get(
            "/api/machineactions/00000000-0000-0000-0000-000000000000",
            &tok,
        )
        .await,
        404,
        "ResourceNotFound",
    );
}

#[tokio::test]
async fn cancel_open_action_then_final_is_400_and_unknown_404() {
    let (sim, _f) = seeded(&[]);
    let tok = sim.token().await;
    let id = action_id(&isolate(&sim, &tok, M_ONLINE).await);
    sim.advance(10.0).await;
    assert_error(
        &sim.post(
            &format!("/api/machineactions/{id}/cancel"),
            &tok,
            json!({"comment": "x"}),
        )
        .await,
        400,
        "MissingRequiredParameter",
    );
    let r = sim
        .post(
            &format!("/api/machineactions/{id}/cancel"),
            &tok,
            json!({"Comment": "changed my mind"}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["status"], "Cancelled");
    assert_eq!(r.body["cancellationRequestor"], CLIENT_ID);
    assert_eq!(r.body["cancellationComment"], "changed my mind");
    assert!(is_ts7(r.body["cancellationDateTimeUtc"].as_str().unwrap()));
    assert_error(
        &sim.post(
            &format!("/api/machineactions/{id}/cancel"),
            &tok,
            json!({"Comment": "again"}),
        )
        .await,
        400,
        "BadRequest",
    );
    assert_error(
        &sim.post(
            "/api/machineactions/00000000-0000-0000-0000-000000000000/cancel",
            &tok,
            json!({"Comment": "x"}),
        )
        .await,
        404,
        "ResourceNotFound",
    );
    sim.advance(600.0).await;
    assert_eq!(action_status(&sim, &tok, &id).await, "Cancelled");
    assert_eq!(sim.ground_truth(M_ONLINE).await["isolated"], false);
    // A finished action cannot be cancelled either.
    let id2 = action_id(&isolate(&sim, &tok, M_ONLINE).await);
    sim.advance(60.0).await;
    assert_error(
        &sim.post(
            &format!("/api/machineactions/{id2}/cancel"),
            &tok,
            json!({"Comment": "late"}),
        )
        .await,
        400,
        "BadRequest",
    );
}

/// Builds a known set of actions and checks that each filter returns exactly the expected ones.
#[tokio::test]
async fn odata_filters_return_exactly_the_matching_actions() {
    let (sim, _f) = seeded(&[]);
    let tok = sim.token().await;
    let a1 = action_id(&isolate(&sim, &tok, M_ONLINE).await);
    sim.advance(100.0).await; // a1 Succeeded
    let a2 = action_id(&isolate(&sim, &tok, M_OFFLINE).await);
    let a3 = action_id(&isolate(&sim, &tok, M_FAILING).await);
    sim.advance(100.0).await; // a3 Failed, a2 Pending
    let r4 = unisolate(&sim, &tok, M_ONLINE).await;
    let a4 = action_id(&r4);
    let a4_created = r4.body["creationDateTimeUtc"].as_str().unwrap().to_string();
    let r5 = sim
        .send(
            "POST",
            &format!("/sim/machines/{M_ISOLATED}/unisolate-external"),
            None,
            Some(json!({})),
        )
        .await;
    assert_eq!(r5.status, 201, "{:?}", r5.body);
    let a5 = r5.body["id"].as_str().unwrap().to_string();
    let a6 = action_id(&isolate(&sim, &tok, M_SPARE).await);
    assert_eq!(
        sim.post(
            &format!("/api/machineactions/{a6}/cancel"),
            &tok,
            json!({"Comment": "no"})
        )
        .await
        .status,
        200
    );

    let q = |f: &str| format!("/api/machineactions?$filter={}", enc(f));
    let cases: Vec<(String, Vec<&str>)> = vec![
        ("status eq 'Pending'".into(), vec![&a2, &a4, &a5]),
        ("type in ('Isolate','Unisolate') and status in ('Pending','InProgress')".into(), vec![&a2, &a4, &a5]),
        ("status ne 'Pending'".into(), vec![&a1, &a3, &a6]),
        ("type eq 'Unisolate'".into(), vec![&a4, &a5]),
        (format!("machineId eq '{M_ONLINE}'"), vec![&a1, &a4]),
        ("requestor eq 'portal-user@contoso.com'".into(), vec![&a5]),
        (format!("requestor eq '{CLIENT_ID}' and type eq 'Isolate'"), vec![&a1, &a2, &a3, &a6]),
        (format!("creationDateTimeUtc ge {a4_created}"), vec![&a4, &a5, &a6]),
        (format!("creationDateTimeUtc gt {a4_created}"), vec![&a5, &a6]),
        (format!("creationDateTimeUtc lt {a4_created}"), vec![&a1, &a2, &a3]),
        (format!("id in ('{a1}', '{a3}')"), vec![&a1, &a3]),
        (format!("(status eq 'Succeeded' or status eq 'Failed') and machineId ne '{M_FAILING}'"), vec![&a1]),
        ("not (type eq 'Isolate')".into(), vec![&a4, &a5]),
        ("status eq 'Cancelled' or (status eq 'Failed')".into(), vec![&a6, &a3]),
        ("creationDateTimeUtc ge 2000-01-01T00:00:00Z and creationDateTimeUtc le 2999-01-01T00:00:00Z".into(), vec![&a1, &a2, &a3, &a4, &a5, &a6]),
        ("status eq 'Succeeded' and status eq 'Failed'".into(), vec![]),
    ];
    for (filter, expected) in cases {
        let r = sim.get(&q(&filter), &tok).await;
        assert_eq!(ids(&r), set(&expected), "filter {filter}");
    }
    // Creation times on a frozen clock are 100 ns apart, so step a little past the pending delay.
    sim.advance(11.0).await;
    assert_eq!(
        ids(&sim.get(&q("status eq 'InProgress'"), &tok).await),
        set(&[&a4, &a5])
    );
}

#[tokio::test]
async fn odata_rejects_unsupported_filters_with_odata_error() {
    let (sim, _f) = seeded(&[]);
    let tok = sim.token().await;
    for filter in [
        "lastUpdateDateTimeUtc ge 2026-01-01T00:00:00Z",
        "status eq",
        "status eq 'Pending' and",
        "(status eq 'Pending'",
        "nosuchfield eq 'x'",
        "status gt 'Pending'",
        "creationDateTimeUtc ge '2026-01-01T00:00:00Z'",
        "status eq 'unterminated",
        "computerDnsName eq 'ws-001.contoso.local'",
    ] {
        let r = sim
            .get(
                &format!("/api/machineactions?$filter={}", enc(filter)),
                &tok,
            )
            .await;
        assert_error(&r, 400, "ODataError");
    }
    for query in [
        "$top=10001",
        "$top=abc",
        "$skip=-1",
        "$orderby=status",
        "$count=maybe",
        "$expand=x",
        "$top=1&$top=2",
    ] {
        assert_error(
            &sim.get(&format!("/api/machineactions?{query}"), &tok).await,
            400,
            "ODataError",
        );
    }
    assert_eq!(
        sim.get("/api/machineactions?$top=10000", &tok).await.status,
        200
    );
}

#[tokio::test]
async fn paging_ordering_and_count() {
    let sim = frozen(&["--machines", "8", "--page-size", "3"]);
    let tok = sim.token().await;
    let machines = sim.machine_ids().await;
    let mut created = Vec::new();
    for m in &machines {
        created.push(action_id(&isolate(&sim, &tok, m).await));
        sim.advance(1.0).await;
    }
    // Follow nextLink to the end: every action once, oldest first.
    let mut seen = Vec::new();
    let mut url = sim.url("/api/machineactions");
    let mut pages = 0;
    loop {
        let r = Sim::into_resp(sim.client.get(&url).bearer_auth(&tok).send().await.unwrap()).await;
        assert_eq!(r.status, 200);
        pages += 1;
        seen.extend(
            r.body["value"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["id"].as_str().unwrap().to_string()),
        );
        match r.body["@odata.nextLink"].as_str() {
            Some(next) => {
                assert!(next.starts_with(&sim.base_url), "absolute nextLink {next}");
                url = next.to_string();
            }
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, created);

    let r = sim
        .get(
            "/api/machineactions?$orderby=creationDateTimeUtc%20desc&$count=true",
            &tok,
        )
        .await;
    assert_eq!(r.body["@odata.count"], 8);
    let first: Vec<String> = r.body["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        first,
        vec![created[7].clone(), created[6].clone(), created[5].clone()]
    );

    // $top larger than a page: the server pages within it.
    let r = sim.get("/api/machineactions?$top=5", &tok).await;
    assert_eq!(r.body["value"].as_array().unwrap().len(), 3);
    let next = r.body["@odata.nextLink"].as_str().unwrap().to_string();
    let r2 = Sim::into_resp(
        sim.client
            .get(&next)
            .bearer_auth(&tok)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(ids(&r2), set(&[&created[3], &created[4]]));
    assert!(r2.body.get("@odata.nextLink").is_none());

    let r = sim.get("/api/machineactions?$skip=6", &tok).await;
    assert_eq!(ids(&r), set(&[&created[6], &created[7]]));
    let r = sim
        .get(
            "/api/machineactions?$top=2&$orderby=creationDateTimeUtc%20asc",
            &tok,
        )
        .await;
    assert_eq!(ids(&r), set(&[&created[0], &created[1]]));
    assert!(r.body.get("@odata.nextLink").is_none());
    let r = sim
        .get(
            &format!(
                "/api/machineactions?$count=true&$filter={}",
                enc(&format!("machineId eq '{}'", machines[0]))
            ),
            &tok,
        )
        .await;
    assert_eq!(r.body["@odata.count"], 1);
}

// ---------------------------------------------------------------- §5 machines

#[tokio::test]
async fn machines_list_and_filters() {
    let (sim, _f) = seeded(&[]);
    let tok = sim.token().await;
    let r = sim.get("/api/machines", &tok).await;
    assert_eq!(ids(&r).len(), 7);
    assert!(
        r.body["@odata.context"]
            .as_str()
            .unwrap()
            .ends_with("#Machines")
    );
    let q = |f: &str| format!("/api/machines?$filter={}", enc(f));
    assert_eq!(
        ids(&sim
            .get(&q("computerDnsName eq 'ws-001.contoso.local'"), &tok)
            .await),
        set(&[M_ONLINE])
    );
    // Short name and FQDN are different records; no substring or prefix matching.
    assert_eq!(
        ids(&sim.get(&q("computerDnsName eq 'ws-001'"), &tok).await),
        set(&[M_SHORT])
    );
    assert_eq!(
        ids(&sim.get(&q("computerDnsName eq 'ws-00'"), &tok).await),
        set(&[])
    );
    assert_eq!(
        ids(&sim
            .get(&q("machineTags/any(tag: tag eq 'finance')"), &tok)
            .await),
        set(&[M_ONLINE, M_ISOLATED])
    );
    assert_eq!(
        ids(&sim
            .get(
                &q("machineTags/any(tag: tag eq 'vip') and healthStatus eq 'Active'"),
                &tok
            )
            .await),
        set(&[M_ONLINE])
    );
    assert_eq!(
        ids(&sim.get(&q("healthStatus eq 'Inactive'"), &tok).await),
        set(&[M_OFFLINE])
    );
    assert_eq!(
        ids(&sim.get("/api/machines?$top=2&$skip=1", &tok).await),
        set(&[M_OFFLINE, M_FAILING])
    );
    assert_eq!(
        ids(&sim.get("/api/machines/findbytag?tag=vip", &tok).await),
        set(&[M_ONLINE])
    );
    assert_error(
        &sim.get(&q("machineTags eq 'vip'"), &tok).await,
        400,
        "ODataError",
    );

    let m = sim.get(&format!("/api/machines/{M_ONLINE}"), &tok).await;
    assert_eq!(m.status, 200);
    assert_eq!(m.body["computerDnsName"], "ws-001.contoso.local");
    assert_eq!(m.body["osPlatform"], "Windows11");
    assert_eq!(m.body["machineTags"], json!(["finance", "vip"]));
    assert!(m.body["rbacGroupId"].is_number());
    for f in [
        "healthStatus",
        "onboardingStatus",
        "rbacGroupName",
        "lastSeen",
        "isPotentialDuplication",
        "mergedIntoMachineId",
    ] {
        assert!(m.body.get(f).is_some(), "missing {f}");
    }
}

#[tokio::test]
async fn machines_404_when_tenant_is_empty_and_optionally_when_filter_matches_nothing() {
    let sim = frozen(&[]);
    let tok = sim.token().await;
    assert_error(
        &sim.get("/api/machines", &tok).await,
        404,
        "ResourceNotFound",
    );

    let sim = frozen(&["--machines", "2", "--empty-filter-404"]);
    let tok = sim.token().await;
    assert_eq!(sim.get("/api/machines", &tok).await.status, 200);
    let r = sim
        .get(
            &format!("/api/machines?$filter={}", enc("computerDnsName eq 'nope'")),
            &tok,
        )
        .await;
    assert_error(&r, 404, "ResourceNotFound");
}

#[tokio::test]
async fn generated_machines_are_deterministic_per_seed() {
    let a = frozen(&["--machines", "5", "--rng-seed", "42"]);
    let b = frozen(&["--machines", "5", "--rng-seed", "42"]);
    let c = frozen(&["--machines", "5", "--rng-seed", "43"]);
    let ia = a.machine_ids().await;
    assert_eq!(ia, b.machine_ids().await);
    assert_ne!(ia, c.machine_ids().await);
    assert!(ia.iter().all(|id| tenant_id_ok(id)));
    let tok = a.token().await;
    let m = a.get(&format!("/api/machines/{}", ia[0]), &tok).await;
    assert_eq!(m.body["computerDnsName"], "host-0001.contoso.local");
}

// ---------------------------------------------------------------- §6 errors and throttling

#[tokio::test]
async fn error_targets_are_fresh_per_response() {
    let (sim, _f) = seeded(&[]);
    let tok = sim.token().await;
    let a = sim
        .get(
            "/api/machines/ffffffffffffffffffffffffffffffffffffffff",
            &tok,
        )
        .await;
    let b = sim
        .get(
            "/api/machines/ffffffffffffffffffffffffffffffffffffffff",
            &tok,
        )
        .await;
    assert_error(&a, 404, "ResourceNotFound");
    assert_ne!(a.body["error"]["target"], b.body["error"]["target"]);
}

#[tokio::test]
async fn quota_per_minute_gives_429_with_retry_after_and_429s_are_free() {
    let sim = frozen(&["--machines", "102"]);
    let tok = sim.token().await;
    let m = sim.machine_ids().await;
    for id in &m[..100] {
        assert_eq!(unisolate(&sim, &tok, id).await.status, 201);
    }
    let r = unisolate(&sim, &tok, &m[100]).await;
    assert_error(&r, 429, "TooManyRequests");
    assert_eq!(r.header("retry-after"), "60");
    // A throttled call consumes nothing: asking again changes nothing.
    let r = unisolate(&sim, &tok, &m[100]).await;
    assert_eq!((r.status, r.header("retry-after")), (429, "60".to_string()));
    // Each API has its own quota.
    assert_eq!(isolate(&sim, &tok, &m[101]).await.status, 201);
    sim.advance(59.0).await;
    let r = unisolate(&sim, &tok, &m[100]).await;
    assert_eq!((r.status, r.header("retry-after")), (429, "1".to_string()));
    sim.advance(1.0).await;
    assert_eq!(unisolate(&sim, &tok, &m[100]).await.status, 201);

    let s = sim.admin_stats().await;
    let u = &s["apis"]["unisolate"];
    assert_eq!(u["calls"], 104);
    assert_eq!(u["throttled"], 3);
    assert_eq!(u["counted"], 101);
    assert_eq!(u["maxCountedPerMinute"], 100);
    assert_eq!(u["maxCallsPerMinute"], 103);
    assert_eq!(s["apis"]["isolate"]["calls"], 1);
    let actions = sim.admin_get("actions").await["value"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(actions, 102);
}

#[tokio::test]
async fn quota_per_hour_window() {
    let sim = frozen(&["--machines", "1", "--token-lifetime", "999999"]);
    let tok = sim.token().await;
    for round in 0..15 {
        for _ in 0..100 {
            let r = sim.get("/api/machineactions?$top=1", &tok).await;
            assert_eq!(r.status, 200, "round {round}");
        }
        sim.advance(60.0).await;
    }
    // t = 900 s: the minute window is empty, the hour holds 1500 calls; the first leaves at 3600.
    let r = sim.get("/api/machineactions", &tok).await;
    assert_error(&r, 429, "TooManyRequests");
    assert_eq!(r.header("retry-after"), "2700");
    // Other APIs are unaffected.
    assert_eq!(sim.get("/api/machines", &tok).await.status, 200);
    sim.advance(2699.0).await;
    assert_eq!(
        sim.get("/api/machineactions", &tok)
            .await
            .header("retry-after"),
        "1"
    );
    sim.advance(1.0).await;
    assert_eq!(sim.get("/api/machineactions", &tok).await.status, 200);
    let s = sim.admin_stats().await;
    assert_eq!(s["apis"]["machineactions-list"]["maxCountedPerHour"], 1500);
    assert_eq!(s["apis"]["machineactions-list"]["maxCountedPerMinute"], 100);
}

#[tokio::test]
async fn quota_retry_after_holds_on_a_running_clock() {
    // Small quota on a fast clock: call until throttled, sleep Retry-After (scaled), succeed.
    let sim = Sim::start(&[
        "--machines",
        "1",
        "--time-scale",
        "20",
        "--quota-per-minute",
        "3",
        "--quota-per-hour",
        "1000",
    ]);
    let tok = sim.token().await;
    let mut retry = None;
    for _ in 0..200 {
        let r = sim.get("/api/machines", &tok).await;
        if r.status == 429 {
            retry = Some(
                r.header("retry-after")
                    .parse::<u64>()
                    .expect("integer Retry-After"),
            );
            break;
        }
        assert_eq!(r.status, 200);
    }
    let retry = retry.expect("a 429 within 200 calls");
    assert!((1..=60).contains(&retry));
    tokio::time::sleep(std::time::Duration::from_secs_f64(
        retry as f64 / 20.0 + 0.05,
    ))
    .await;
    assert_eq!(sim.get("/api/machines", &tok).await.status, 200);
}

#[tokio::test]
async fn quotas_are_per_app() {
    let (sim, _seed, a, b) = two_apps("2").await;
    assert_eq!(sim.get("/api/machines", &a).await.status, 200);
    assert_eq!(sim.get("/api/machines", &a).await.status, 200);
    assert_eq!(sim.get("/api/machines", &a).await.status, 429);
    assert_eq!(sim.get("/api/machines", &b).await.status, 200);
    let calls = sim.admin_calls().await;
    let throttled: Vec<&Value> = calls.iter().filter(|c| c["status"] == 429).collect();
    assert_eq!(throttled.len(), 1);
    assert_eq!(throttled[0]["app"], "app-a");
}

// ---------------------------------------------------------------- §6/§8 a shared quota

/// The `message` of an MDE error body.
fn message(r: &Resp) -> String {
    r.body["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// `foreign.apis.<api>` of the stats: (admitted, refused).
fn foreign(stats: &Value, api: &str) -> (u64, u64) {
    let t = &stats["foreign"]["apis"][api];
    (
        t["admitted"].as_u64().expect("admitted"),
        t["refused"].as_u64().expect("refused"),
    )
}

#[tokio::test]
async fn foreign_constant_load_takes_its_share_of_the_minute() {
    let sim = frozen(&[
        "--machines",
        "10",
        "--quota-per-minute",
        "10",
        "--foreign-load",
        "unisolate:4",
    ]);
    let tok = sim.token().await;
    let m = sim.machine_ids().await;
    // The other app calls at 0, 15, 30 and 45 s: by 59 s it used 4 of the 10.
    sim.advance(59.0).await;
    for id in &m[..6] {
        assert_eq!(unisolate(&sim, &tok, id).await.status, 201);
    }
    let r = unisolate(&sim, &tok, &m[6]).await;
    assert_error(&r, 429, "TooManyRequests");
    // Its call from 0 s leaves the window in 1 s...
    assert_eq!(r.header("retry-after"), "1");
    // ...and in `endpoint` mode isolate has a budget of its own.
    for id in &m[6..] {
        assert_eq!(isolate(&sim, &tok, id).await.status, 201);
    }
    // After the wait the other app's call due at 60 s takes the freed slot first.
    sim.advance(1.0).await;
    let r = unisolate(&sim, &tok, &m[6]).await;
    assert_error(&r, 429, "TooManyRequests");
    assert_eq!(r.header("retry-after"), "15");

    let s = sim.admin_stats().await;
    assert_eq!(foreign(&s, "unisolate"), (5, 0));
    assert_eq!(foreign(&s, "isolate"), (0, 0));
    assert_eq!(s["foreign"]["byApp"][CLIENT_ID]["unisolate"]["admitted"], 5);
    assert_eq!(s["foreign"]["load"][0]["api"], "unisolate");
    assert_eq!(s["foreign"]["load"][0]["perMinute"], 4);
    assert_eq!(s["foreign"]["load"][0]["pattern"], "constant");
    // The operator's own stats and call log hold only its own calls.
    let u = &s["apis"]["unisolate"];
    assert_eq!(
        (u["calls"].as_u64(), u["counted"].as_u64()),
        (Some(8), Some(6))
    );
    assert_eq!(u["throttled"], 2);
    assert_eq!(u["maxCountedPerMinute"], 6);
    assert_eq!(
        sim.admin_get("calls?api=unisolate").await["calls"]
            .as_array()
            .unwrap()
            .len(),
        8
    );
}

#[tokio::test]
async fn foreign_burst_load_spends_the_budget_at_each_minute_start() {
    let sim = frozen(&[
        "--machines",
        "2",
        "--quota-per-minute",
        "10",
        "--foreign-load",
        "isolate:12:burst",
    ]);
    let tok = sim.token().await;
    let m = sim.machine_ids().await;
    // All 12 at the first instant: 10 admitted, 2 refused.
    let r = isolate(&sim, &tok, &m[0]).await;
    assert_error(&r, 429, "TooManyRequests");
    assert_eq!(r.header("retry-after"), "60");
    assert_eq!(unisolate(&sim, &tok, &m[1]).await.status, 201);
    assert_eq!(foreign(&sim.admin_stats().await, "isolate"), (10, 2));
    // Each minute the burst comes first and takes the whole budget again.
    sim.advance(60.0).await;
    assert_eq!(isolate(&sim, &tok, &m[0]).await.status, 429);
    let s = sim.admin_stats().await;
    assert_eq!(foreign(&s, "isolate"), (20, 4));
    assert_eq!(s["apis"]["isolate"]["counted"], 0);
    assert_eq!(s["apis"]["isolate"]["throttled"], 2);
}

#[tokio::test]
async fn foreign_load_changes_at_run_time() {
    let sim = frozen(&["--machines", "20", "--quota-per-minute", "10"]);
    let tok = sim.token().await;
    let m = sim.machine_ids().await;
    let off = sim.admin_get("foreign-load").await;
    assert_eq!(off["load"], json!([]));
    sim.advance(30.0).await;
    let now = sim.now().await;
    let set = sim
        .admin_post(
            "foreign-load",
            json!({"load": [{"api": "unisolate", "perMinute": 6}]}),
        )
        .await;
    assert_eq!(
        set,
        json!({"load": [{"api": "unisolate", "perMinute": 6, "pattern": "constant"}], "since": now})
    );
    assert_eq!(sim.admin_get("foreign-load").await, set);
    // From 30 s on, every 10 s: 30, 40, 50 by 55 s.
    sim.advance(25.0).await;
    for id in &m[..7] {
        assert_eq!(unisolate(&sim, &tok, id).await.status, 201);
    }
    assert_eq!(unisolate(&sim, &tok, &m[7]).await.status, 429);
    assert_eq!(foreign(&sim.admin_stats().await, "unisolate"), (3, 0));
    // Off again: a minute later the whole budget is the app's.
    sim.admin_post("foreign-load", json!({"load": []})).await;
    sim.advance(60.0).await;
    for id in &m[7..17] {
        assert_eq!(unisolate(&sim, &tok, id).await.status, 201);
    }
    assert_eq!(unisolate(&sim, &tok, &m[17]).await.status, 429);
    assert_eq!(foreign(&sim.admin_stats().await, "unisolate"), (3, 0));
    for bad in [
        json!({"load": [{"api": "token", "perMinute": 5}]}),
        json!({"load": [{"api": "release", "perMinute": 5}]}),
        json!({"load": [{"api": "isolate", "perMinute": 0}]}),
        json!({"load": [{"api": "isolate", "perMinute": 5, "pattern": "spiky"}]}),
        json!({"load": [{"api": "isolate", "perMinute": 5, "app": "nobody"}]}),
        json!({"load": [], "extra": 1}),
        json!({}),
    ] {
        let r = sim
            .send("POST", "/sim/foreign-load", None, Some(bad.clone()))
            .await;
        assert_error(&r, 400, "InvalidInput");
        assert_eq!(
            sim.admin_get("foreign-load").await["load"],
            json!([]),
            "{bad}"
        );
    }
}

#[tokio::test]
async fn foreign_load_targets_one_app_and_its_refusals_are_counted() {
    let (sim, _seed, a, b) = two_apps("3").await;
    for _ in 0..3 {
        assert_eq!(sim.get("/api/machines", &a).await.status, 200);
    }
    sim.admin_post(
        "foreign-load",
        json!({"load": [{"api": "machines-list", "perMinute": 2, "pattern": "burst", "app": "app-a"}]}),
    )
    .await;
    // app-a's budget is spent: both foreign calls are refused; app-b is untouched.
    assert_eq!(sim.get("/api/machines", &b).await.status, 200);
    let s = sim.admin_stats().await;
    assert_eq!(foreign(&s, "machines-list"), (0, 2));
    assert_eq!(
        s["foreign"]["byApp"]["app-a"]["machines-list"]["refused"],
        2
    );
    assert!(s["foreign"]["byApp"]["app-b"].is_null());
    // Refused calls took nothing: after the minute app-a's own 3 leave and the next burst fits.
    sim.advance(60.0).await;
    assert_eq!(sim.get("/api/machines", &a).await.status, 200);
    assert_eq!(sim.get("/api/machines", &a).await.status, 429);
    assert_eq!(foreign(&sim.admin_stats().await, "machines-list"), (2, 2));
}

#[tokio::test]
async fn foreign_load_runs_on_a_scaled_clock() {
    let sim = Sim::start(&[
        "--machines",
        "1",
        "--time-scale",
        "60",
        "--foreign-load",
        "machineactions-list:60",
        "--quota-per-minute",
        "1000",
        "--quota-per-hour",
        "100000",
    ]);
    let since = sim.admin_get("foreign-load").await["since"]
        .as_str()
        .unwrap()
        .to_string();
    let s = sim
        .wait_until(30, "foreign calls on a running clock", || async {
            let s = sim.admin_stats().await;
            (foreign(&s, "machineactions-list").0 >= 5).then_some(s)
        })
        .await;
    // One call per simulated second from `since`, all played up to the `now` of the answer.
    let t = |v: &str| chrono::DateTime::parse_from_rfc3339(v).expect("timestamp");
    let elapsed = (t(s["now"].as_str().unwrap()) - t(&since)).num_milliseconds();
    assert_eq!(
        foreign(&s, "machineactions-list"),
        (elapsed as u64 / 1000 + 1, 0)
    );
}

#[tokio::test]
async fn quota_key_app_shares_one_budget_across_apis() {
    let sim = frozen(&[
        "--machines",
        "3",
        "--quota-per-minute",
        "5",
        "--quota-key",
        "app",
    ]);
    let tok = sim.token().await;
    let m = sim.machine_ids().await;
    assert_eq!(sim.get("/api/machines", &tok).await.status, 200);
    assert_eq!(sim.get("/api/machineactions", &tok).await.status, 200);
    assert_eq!(
        sim.get(&format!("/api/machines/{}", m[0]), &tok)
            .await
            .status,
        200
    );
    let action = action_id(&isolate(&sim, &tok, &m[0]).await);
    assert_eq!(unisolate(&sim, &tok, &m[1]).await.status, 201);
    // The sixth call of any API is refused.
    let r = isolate(&sim, &tok, &m[2]).await;
    assert_error(&r, 429, "TooManyRequests");
    assert_eq!(r.header("retry-after"), "60");
    assert!(
        message(&r).starts_with("Maximum allowed 5 per 00:01:00 "),
        "{r:?}"
    );
    assert_eq!(sim.get("/api/machines", &tok).await.status, 429);
    assert_eq!(
        sim.get(&format!("/api/machineactions/{action}"), &tok)
            .await
            .status,
        429
    );
    let cancel = sim
        .post(
            &format!("/api/machineactions/{action}/cancel"),
            &tok,
            json!({"Comment": "x"}),
        )
        .await;
    assert_eq!(cancel.status, 429);
    let s = sim.admin_stats().await;
    assert_eq!(s["limits"]["key"], "app");
    // Per endpoint, the same history leaves every API under its limit.
    let set = sim
        .admin_post("settings", json!({"quotaKey": "endpoint"}))
        .await;
    assert_eq!(set["quotaKey"], "endpoint");
    assert_eq!(sim.get("/api/machines", &tok).await.status, 200);
    assert_eq!(action_id(&isolate(&sim, &tok, &m[2]).await).len(), 36);
    sim.admin_post("settings", json!({"quotaKey": "app"})).await;
    assert_eq!(sim.get("/api/machines", &tok).await.status, 429);
    sim.advance(60.0).await;
    assert_eq!(sim.get("/api/machines", &tok).await.status, 200);
}

#[tokio::test]
async fn quota_key_app_takes_foreign_reads_from_the_writes_budget() {
    let sim = frozen(&[
        "--machines",
        "5",
        "--quota-per-minute",
        "5",
        "--quota-key",
        "app",
        "--foreign-load",
        "machineactions-list:3:burst",
    ]);
    let tok = sim.token().await;
    let m = sim.machine_ids().await;
    assert_eq!(unisolate(&sim, &tok, &m[0]).await.status, 201);
    assert_eq!(isolate(&sim, &tok, &m[1]).await.status, 201);
    assert_eq!(isolate(&sim, &tok, &m[2]).await.status, 429);
    assert_eq!(
        foreign(&sim.admin_stats().await, "machineactions-list"),
        (3, 0)
    );
}

#[tokio::test]
async fn retry_after_modes_shape_the_429() {
    let again = "You can send requests again in 60 seconds";
    let head = "Maximum allowed 1 per 00:01:00 for the key Destination+TenantID+AppID.";
    for (mode, header, with_wait) in [
        ("header", "60", true),
        ("body-only", "", true),
        ("none", "", false),
        ("long", "120", true),
    ] {
        let sim = frozen(&["--quota-per-minute", "1", "--retry-after", mode]);
        let tok = sim.token().await;
        assert_eq!(sim.get("/api/machineactions", &tok).await.status, 200);
        let r = sim.get("/api/machineactions", &tok).await;
        assert_error(&r, 429, "TooManyRequests");
        assert_eq!(r.header("retry-after"), header, "{mode}");
        let msg = message(&r);
        assert!(msg.starts_with(head), "{mode}: {msg}");
        assert_eq!(msg.contains(again), with_wait, "{mode}: {msg}");
        assert_eq!(msg.contains("again in"), with_wait, "{mode}: {msg}");
        assert_eq!(sim.admin_get("settings").await["retryAfter"], mode);
    }
    // The hour window: `long` adds an hour; the body names the hour limit and the true wait.
    let sim = frozen(&[
        "--quota-per-minute",
        "0",
        "--quota-per-hour",
        "2",
        "--retry-after",
        "long",
    ]);
    let tok = sim.token().await;
    for _ in 0..2 {
        assert_eq!(sim.get("/api/machineactions", &tok).await.status, 200);
    }
    sim.advance(100.0).await;
    let r = sim.get("/api/machineactions", &tok).await;
    assert_eq!(r.header("retry-after"), "7100");
    let msg = message(&r);
    assert!(msg.starts_with("Maximum allowed 2 per 01:00:00 "), "{msg}");
    assert!(msg.ends_with("again in 3500 seconds"), "{msg}");
    // The mode is a setting too.
    sim.admin_post("settings", json!({"retryAfter": "header"}))
        .await;
    assert_eq!(
        sim.get("/api/machineactions", &tok)
            .await
            .header("retry-after"),
        "3500"
    );
}

// ---------------------------------------------------------------- malformed input

#[tokio::test]
async fn malformed_bodies_get_the_error_json() {
    let (sim, _f) = seeded(&[]);
    let tok = sim.token().await;
    let path = format!("/api/machines/{M_ONLINE}/isolate");
    assert_error(
        &sim.send_raw("POST", &path, Some(&tok), "{not json").await,
        400,
        "InvalidRequestBody",
    );
    assert_error(
        &sim.send_raw("POST", &path, Some(&tok), "[1,2]").await,
        400,
        "InvalidRequestBody",
    );
    assert_error(
        &sim.send_raw("POST", &path, Some(&tok), "").await,
        400,
        "InvalidRequestBody",
    );
    assert_error(
        &sim.send_raw("POST", &path, Some(&tok), "\u{0}\u{1}garbage")
            .await,
        400,
        "InvalidRequestBody",
    );
    let huge = format!("{{\"Comment\": \"{}\"}}", "x".repeat(2 << 20));
    assert_error(
        &sim.send_raw("POST", &path, Some(&tok), &huge).await,
        413,
        "InvalidRequestBody",
    );
    assert!(
        sim.ground_truth(M_ONLINE).await["actions"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn unknown_paths_and_methods_get_the_error_json() {
    let (sim, _f) = seeded(&[]);
    let tok = sim.token().await;
    assert_error(&sim.get("/api/nope", &tok).await, 404, "NotFound");
    assert_error(&sim.get("/api/machines/x/y/z", &tok).await, 404, "NotFound");
    assert_error(
        &sim.send("GET", "/totally/else", None, None).await,
        404,
        "NotFound",
    );
    assert_error(&sim.send("GET", "/", None, None).await, 404, "NotFound");
    assert_error(
        &sim.send("DELETE", "/api/machines", Some(&tok), None).await,
        405,
        "MethodNotAllowed",
    );
    assert_error(
        &sim.send(
            "GET",
            &format!("/api/machines/{M_ONLINE}/isolate"),
            Some(&tok),
            None,
        )
        .await,
        405,
        "MethodNotAllowed",
    );
    assert_error(
        &sim.send("GET", "/sim/nope", None, None).await,
        404,
        "NotFound",
    );
    let calls = sim.admin_calls().await;
    assert!(
        calls
            .iter()
            .any(|c| c["api"] == "unknown" && c["status"] == 404)
    );
}

#[tokio::test]
async fn garbage_on_the_socket_does_not_hurt_the_server() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (sim, _f) = seeded(&[]);
    let addr = sim.base_url.trim_start_matches("http://").to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"\x16\x03\x01 this is not http\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(30), s.read_to_end(&mut buf)).await;
    // Half a request, then hang up.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"POST /api/machines/x/isolate HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
        .await
        .unwrap();
    drop(s);
    let tok = sim.token().await;
    assert_eq!(sim.get("/api/machines", &tok).await.status, 200);
}

// ---------------------------------------------------------------- faults

#[tokio::test]
async fn fault_5xx_rate_answers_500_before_applying() {
    let (sim, _f) = seeded(&["--fault-5xx-rate", "1"]);
    let tok = sim.token().await;
    assert_error(
        &isolate(&sim, &tok, M_ONLINE).await,
        500,
        "InternalServerError",
    );
    assert!(
        sim.ground_truth(M_ONLINE).await["actions"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    sim.admin_post("faults", json!({"fault5xxRate": 0.0})).await;
    assert_eq!(isolate(&sim, &tok, M_ONLINE).await.status, 201);
}

#[tokio::test]
async fn lost_response_creates_the_action_but_the_client_sees_an_error() {
    let (sim, _f) = seeded(&[]);
    let tok = sim.token().await;
    sim.admin_post(
        "faults",
        json!({"oneShot": [{"kind": "lost-response", "api": "isolate"}]}),
    )
    .await;
    let res = sim
        .client
        .post(sim.url(&format!("/api/machines/{M_ONLINE}/isolate")))
        .bearer_auth(&tok)
        .json(&json!({"Comment": "lost"}))
        .send()
        .await;
    assert!(res.is_err(), "expected a transport error, got {res:?}");
    let gt = sim.ground_truth(M_ONLINE).await;
    assert_eq!(gt["actions"].as_array().unwrap().len(), 1);
    let created = gt["actions"][0]["id"].as_str().unwrap().to_string();
    let calls = sim.admin_calls().await;
    let c = calls.iter().find(|c| c["api"] == "isolate").unwrap();
    assert_eq!(c["fault"], "lost-response");
    assert_eq!(c["actionId"], created.as_str());
    // A blind retry does not create a second action: it is rejected as a duplicate.
    assert_error(
        &isolate(&sim, &tok, M_ONLINE).await,
        400,
        "ActiveRequestAlreadyExists",
    );
    // The one-shot is used up.
    assert_eq!(unisolate(&sim, &tok, M_ISOLATED).await.status, 201);
}

#[tokio::test]
async fn dropped_connection_applies_nothing() {
    let (sim, _f) = seeded(&[]);
    let tok = sim.token().await;
    sim.admin_post(
        "faults",
        json!({"oneShot": [{"kind": "drop", "api": "unisolate", "count": 2}]}),
    )
    .await;
    for _ in 0..2 {
        let res = sim
            .client
            .post(sim.url(&format!("/api/machines/{M_ISOLATED}/unisolate")))
            .bearer_auth(&tok)
            .json(&json!({"Comment": "dropped"}))
            .send()
            .await;
        assert!(res.is_err());
    }
    assert!(
        sim.ground_truth(M_ISOLATED).await["actions"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let s = sim.admin_stats().await;
    assert_eq!(s["apis"]["unisolate"]["faulted"], 2);
    assert_eq!(s["apis"]["unisolate"]["counted"], 0);
    assert_eq!(unisolate(&sim, &tok, M_ISOLATED).await.status, 201);
    let calls = sim.admin_calls().await;
    assert_eq!(
        calls
            .iter()
            .filter(|c| c["fault"] == "drop" && c["status"] == 0)
            .count(),
        2
    );
}

#[tokio::test]
async fn random_faults_are_deterministic_per_seed() {
    async fn outcomes(sim: &Sim) -> Vec<u16> {
        let tok = sim.token().await;
        let mut v = Vec::new();
        for _ in 0..30 {
            v.push(sim.get("/api/machines", &tok).await.status);
        }
        v
    }
    let a = frozen(&[
        "--machines",
        "1",
        "--fault-5xx-rate",
        "0.5",
        "--rng-seed",
        "7",
    ]);
    let b = frozen(&[
        "--machines",
        "1",
        "--fault-5xx-rate",
        "0.5",
        "--rng-seed",
        "7",
    ]);
    let oa = outcomes(&a).await;
    assert_eq!(oa, outcomes(&b).await);
    assert!(oa.contains(&500) && oa.contains(&200), "{oa:?}");
}

#[tokio::test]
async fn latency_and_fault_settings_at_run_time() {
    let sim = frozen(&["--machines", "1", "--latency-ms", "20"]);
    let tok = sim.token().await;
    assert_eq!(sim.get("/api/machines", &tok).await.status, 200);
    let f = sim
        .admin_post("faults", json!({"latencyMs": 5, "apis": ["isolate"]}))
        .await;
    assert_eq!(f["latencyMs"], 5);
    assert_eq!(f["apis"], json!(["isolate"]));
    let r = sim
        .send("POST", "/sim/faults", None, Some(json!({"dropRate": 2.0})))
        .await;
    assert_eq!(r.status, 400);
    let r = sim
        .send("POST", "/sim/faults", None, Some(json!({"noSuch": 1})))
        .await;
    assert_eq!(r.status, 400);
}

// ---------------------------------------------------------------- TLS

#[tokio::test]
async fn tls_mode_works_with_the_ca_file() {
    let sim = frozen(&["--machines", "1", "--tls"]);
    assert!(
        sim.base_url.starts_with("https://127.0.0.1:"),
        "{}",
        sim.base_url
    );
    let pem = sim.ca_pem.as_ref().expect("CA written");
    assert!(pem.contains("BEGIN CERTIFICATE"));
    let tok = sim.token().await;
    assert_eq!(sim.get("/api/machines", &tok).await.status, 200);
    // The certificate also names localhost.
    let port = sim.base_url.rsplit(':').next().unwrap();
    let r = sim
        .client
        .get(format!("https://localhost:{port}/sim/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Without the CA the server is not trusted.
    let plain = reqwest::Client::builder().build().unwrap();
    assert!(plain.get(sim.url("/sim/health")).send().await.is_err());
}

// ---------------------------------------------------------------- admin API

#[tokio::test]
async fn admin_time_advances_exactly() {
    let sim = frozen(&["--start-time", "2026-03-01T12:00:00Z"]);
    let t = sim.admin_get("time").await;
    assert_eq!(t["now"], "2026-03-01T12:00:00.0000000Z");
    assert_eq!(t["timeScale"], 0.0);
    let t = sim.advance(3600.5).await;
    assert_eq!(t["now"], "2026-03-01T13:00:00.5000000Z");
    sim.admin_post("settings", json!({"timeScale": 2.0})).await;
    assert_eq!(sim.admin_get("time").await["timeScale"], 2.0);
}

#[tokio::test]
async fn admin_external_isolation_and_person_cancel() {
    let (sim, _f) = seeded(&[]);
    let tok = sim.token().await;
    let r = sim
        .send(
            "POST",
            &format!("/sim/machines/{M_ONLINE}/isolate-external"),
            None,
            Some(json!({"immediate": true})),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["requestor"], "portal-user@contoso.com");
    assert_eq!(r.body["status"], "Succeeded");
    assert_eq!(sim.ground_truth(M_ONLINE).await["isolated"], true);
    let listed = sim
        .get(
            &format!(
                "/api/machineactions?$filter={}",
                enc("requestor eq 'portal-user@contoso.com'")
            ),
            &tok,
        )
        .await;
    assert_eq!(ids(&listed).len(), 1);

    // A portal action that is not immediate follows the normal lifecycle.
    let r = sim
        .send(
            "POST",
            &format!("/sim/machines/{M_SPARE}/isolate-external"),
            None,
            Some(json!({"requestor": "alice@contoso.com"})),
        )
        .await;
    let ext = r.body["id"].as_str().unwrap().to_string();
    assert_eq!(r.body["status"], "Pending");
    // A person cancels the operator's action in the portal.
    let mine = action_id(&unisolate(&sim, &tok, M_ISOLATED).await);
    let c = sim
        .admin_post(
            &format!("actions/{mine}/cancel"),
            json!({"requestor": "bob@contoso.com", "comment": "not now"}),
        )
        .await;
    assert_eq!(c["status"], "Cancelled");
    assert_eq!(c["cancellationRequestor"], "bob@contoso.com");
    assert_eq!(action_status(&sim, &tok, &mine).await, "Cancelled");
    let r = sim
        .send(
            "POST",
            &format!("/sim/actions/{mine}/cancel"),
            None,
            Some(json!({})),
        )
        .await;
    assert_eq!(r.status, 400);
    sim.advance(61.0).await;
    assert_eq!(action_status(&sim, &tok, &ext).await, "Succeeded");
    let plan = sim.admin_get(&format!("actions/{ext}")).await;
    assert_eq!(plan["plan"]["finalStatus"], "Succeeded");
}

#[tokio::test]
async fn admin_add_patch_and_reset_machines() {
    let (sim, _f) = seeded(&[]);
    let tok = sim.token().await;
    let added = sim.admin_post("machines", json!({"count": 2, "behaviour": "offline", "machines": [{"computerDnsName": "new.contoso.local", "machineTags": ["x"]}]})).await;
    let added: Vec<String> = added["added"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(added.len(), 3);
    assert_eq!(ids(&sim.get("/api/machines", &tok).await).len(), 10);
    let dup = sim
        .send(
            "POST",
            "/sim/machines",
            None,
            Some(json!({"machines": [{"id": M_ONLINE, "computerDnsName": "dup"}]})),
        )
        .await;
    assert_eq!(dup.status, 409);

    // An offline device that comes online picks its pending action up.
    let offline = &added[1];
    assert_eq!(sim.ground_truth(offline).await["behaviour"], "offline");
    let id = action_id(&isolate(&sim, &tok, offline).await);
    sim.advance(1000.0).await;
    assert_eq!(action_status(&sim, &tok, &id).await, "Pending");
    let r = sim
        .send(
            "PATCH",
            &format!("/sim/machines/{offline}"),
            None,
            Some(json!({"behaviour": "online", "healthStatus": "Active"})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    sim.advance(60.0).await;
    assert_eq!(action_status(&sim, &tok, &id).await, "Succeeded");
    assert_eq!(sim.ground_truth(offline).await["isolated"], true);

    sim.admin_post("settings", json!({"duplicateMode": "allow"}))
        .await;
    sim.admin_post("reset", json!({})).await;
    assert!(sim.admin_calls().await.is_empty());
    assert!(
        sim.admin_get("actions").await["value"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_eq!(sim.machine_ids().await.len(), 7);
    assert_eq!(sim.admin_get("settings").await["duplicateMode"], "reject");
    // Tokens are cleared too.
    assert_error(&sim.get("/api/machines", &tok).await, 401, "Unauthorized");
}

#[tokio::test]
async fn admin_settings_change_duplicate_mode_at_run_time() {
    let (sim, _f) = seeded(&[]);
    let tok = sim.token().await;
    let s = sim
        .admin_post(
            "settings",
            json!({"duplicateMode": "return-existing", "quotaPerMinute": 50}),
        )
        .await;
    assert_eq!(s["quotaPerMinute"], 50);
    let first = action_id(&isolate(&sim, &tok, M_ONLINE).await);
    assert_eq!(
        isolate(&sim, &tok, M_ONLINE).await.body["id"],
        first.as_str()
    );
    assert_eq!(
        sim.send("POST", "/sim/settings", None, Some(json!({"bogus": 1})))
            .await
            .status,
        400
    );
    assert_eq!(
        sim.send("POST", "/sim/settings", None, Some(json!({"pageSize": 0})))
            .await
            .status,
        400
    );
}

#[tokio::test]
async fn admin_calls_and_exact_window_stats() {
    let sim = frozen(&["--machines", "1"]);
    let tok = sim.token().await;
    for _ in 0..3 {
        sim.get("/api/machines", &tok).await;
    }
    sim.advance(30.0).await;
    for _ in 0..2 {
        sim.get("/api/machines", &tok).await;
    }
    sim.advance(40.0).await;
    sim.get("/api/machines", &tok).await;
    let s = sim.admin_stats().await;
    let ml = &s["apis"]["machines-list"];
    assert_eq!(ml["calls"], 6);
    assert_eq!(ml["maxCallsPerMinute"], 5);
    assert_eq!(ml["maxCallsPerHour"], 6);
    assert_eq!(s["apis"]["token"]["calls"], 1);
    let calls = sim.admin_calls().await;
    let c = calls.iter().find(|c| c["api"] == "machines-list").unwrap();
    for k in [
        "seq", "simTime", "realTime", "app", "method", "path", "status", "api",
    ] {
        assert!(c.get(k).is_some(), "call log lacks {k}");
    }
    assert_eq!(c["app"], CLIENT_ID);
    assert_eq!(c["method"], "GET");
    assert_eq!(c["path"], "/api/machines");
    assert!(is_ts7(c["simTime"].as_str().unwrap()));
    let filtered = sim.admin_get("calls?api=token").await;
    assert_eq!(filtered["calls"].as_array().unwrap().len(), 1);
}

// ---------------------------------------------------------------- CLI

#[test]
fn help_explains_every_flag_with_its_env_var() {
    let out = std::process::Command::new(common::sim::binary())
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--listen",
        "--tls",
        "--ca-out",
        "--machines",
        "--seed",
        "--rng-seed",
        "--token-lifetime",
        "--page-size",
        "--duplicate-mode",
        "--pending-delay",
        "--progress-delay",
        "--offline-timeout",
        "--quota-per-minute",
        "--quota-per-hour",
        "--quota-key",
        "--retry-after",
        "--foreign-load",
        "--time-scale",
        "--fault-5xx-rate",
        "--latency-ms",
        "--drop-rate",
        "--lost-response-rate",
        "--audience",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
    assert!(help.contains("MDE_SIM_TIME_SCALE"));
    assert!(help.contains("MDE_SIM_DUPLICATE_MODE"));
    assert!(help.contains("MDE_SIM_FOREIGN_LOAD"));
    assert!(help.contains("MDE_SIM_QUOTA_KEY"));
    assert!(help.contains("MDE_SIM_RETRY_AFTER"));
}

#[test]
fn bad_flags_fail_fast() {
    for args in [
        &["--drop-rate", "2"][..],
        &["--time-scale", "-1"],
        &["--page-size", "0"],
        &["--seed", "/nonexistent/seed.yaml"],
        &["--foreign-load", "release:5"],
        &["--foreign-load", "unisolate"],
        &["--quota-key", "tenant"],
        &["--retry-after", "sometimes"],
    ] {
        let out = std::process::Command::new(common::sim::binary())
            .args(args)
            .args(["--listen", "127.0.0.1:0"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(out.stdout.is_empty(), "nothing on stdout for {args:?}");
    }
}

/// MDE's `Date` header is MDE's clock: the simulated one, not this machine's (clients measure
/// the age of actions against it, e.g. to rebuild their quota ledger after a restart).
#[tokio::test]
async fn the_date_header_is_the_simulated_clock() {
    let sim = frozen(&["--start-time", "2020-01-01T00:00:00Z"]);
    let tok = sim.token().await;
    sim.advance(90.0).await;
    let r = sim.get("/api/machines", &tok).await;
    assert_eq!(r.header("date"), "Wed, 01 Jan 2020 00:01:30 GMT");
    let admin = sim.send("GET", "/sim/time", None, None).await;
    assert_eq!(admin.header("date"), "Wed, 01 Jan 2020 00:01:30 GMT");
}

// ---------------------------------------------------------------- §8 fleet selection

const AAD: &str = "Automatic Attack Disruption";
const AAD_SOURCE: &str = "AutomaticAttackDisruption";
const F_AAD1: &str = "a1000000000000000000000000000000000000a1";
const F_AAD2: &str = "a2000000000000000000000000000000000000a2";
const F_AAD3: &str = "a3000000000000000000000000000000000000a3";
const F_AAD_RELEASED: &str = "a4000000000000000000000000000000000000a4";
const F_SOC_SEEDED: &str = "b1000000000000000000000000000000000000b1";
const F_PERSON1: &str = "c1000000000000000000000000000000000000c1";
const F_PERSON2: &str = "c2000000000000000000000000000000000000c2";
const F_PLAIN: &str = "d1000000000000000000000000000000000000d1";

const FLEET_SEED: &str = r#"
machines:
  - id: "a1000000000000000000000000000000000000a1"
    computerDnsName: srv-01.contoso.local
    rbacGroupName: Servers
    machineTags: [prod, web]
    isolatedBy:
      requestor: Automatic Attack Disruption
      requestSource: AutomaticAttackDisruption
      at: "2026-12-01T10:00:00Z"
      comment: Contained by automatic attack disruption
  - id: "a2000000000000000000000000000000000000a2"
    computerDnsName: srv-02.contoso.local
    rbacGroupName: Servers
    machineTags: [prod]
    isolatedBy:
      requestor: Automatic Attack Disruption
      requestSource: AutomaticAttackDisruption
      at: "2026-12-01T10:00:05.5Z"
      isolationType: Selective
  - id: "a3000000000000000000000000000000000000a3"
    computerDnsName: ws-03.contoso.local
    rbacGroupName: Laptops
    machineTags: [web]
    isolated: true
    isolatedBy: {requestor: Automatic Attack Disruption, requestSource: AutomaticAttackDisruption, at: "2026-12-02T00:00:00Z"}
  - id: "a4000000000000000000000000000000000000a4"
    computerDnsName: ws-04.contoso.local
    rbacGroupName: Laptops
    isolatedBy: {requestor: Automatic Attack Disruption, requestSource: AutomaticAttackDisruption, at: "2026-12-01T09:00:00Z"}
  - id: "b1000000000000000000000000000000000000b1"
    computerDnsName: ws-05.contoso.local
    rbacGroupName: Laptops
    isolatedBy: {requestor: soc-analyst@contoso.com}
  - id: "c1000000000000000000000000000000000000c1"
    computerDnsName: ws-06.contoso.local
    machineTags: [prod, web]
  - id: "c2000000000000000000000000000000000000c2"
    computerDnsName: ws-07.contoso.local
  - id: "d1000000000000000000000000000000000000d1"
    computerDnsName: ws-08.contoso.local
    rbacGroupName: Servers
"#;

const FLEET_START: &str = "2026-12-05T08:00:00Z";

fn fleet(args: &[&str]) -> (Sim, tempfile::NamedTempFile) {
    let f = seed_file(FLEET_SEED);
    let path = f.path().to_str().expect("utf8 path").to_string();
    let mut all = vec!["--seed", path.as_str(), "--start-time", FLEET_START];
    all.extend_from_slice(args);
    (frozen(&all), f)
}

/// API calls (not token requests) the simulator has logged.
async fn api_calls(sim: &Sim) -> usize {
    sim.admin_calls()
        .await
        .iter()
        .filter(|c| c["api"] != "token")
        .count()
}

#[tokio::test]
async fn isolated_by_seeds_are_found_by_requestor_among_people_and_releases() {
    // One budget of two calls a minute for everything: seeded isolations must use none of it.
    let (sim, _f) = fleet(&["--quota-per-minute", "2", "--quota-key", "app"]);
    // People isolate two devices in the portal; one attack-disruption device is released.
    for (m, who) in [
        (F_PERSON1, "alice@contoso.com"),
        (F_PERSON2, "bob@contoso.com"),
    ] {
        let r = sim
            .send(
                "POST",
                &format!("/sim/machines/{m}/isolate-external"),
                None,
                Some(json!({"requestor": who, "immediate": true})),
            )
            .await;
        assert_eq!(r.status, 201, "{:?}", r.body);
        assert_eq!(r.body["requestSource"], "Portal");
    }
    let r = sim
        .send(
            "POST",
            &format!("/sim/machines/{F_AAD_RELEASED}/unisolate-external"),
            None,
            Some(json!({"requestor": "alice@contoso.com", "immediate": true})),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);

    // Ground truth: seeded devices isolated by their seeded action, the released one not.
    let mut seeded = std::collections::BTreeMap::new();
    for m in [F_AAD1, F_AAD2, F_AAD3, F_SOC_SEEDED] {
        let g = sim.ground_truth(m).await;
        assert_eq!(g["isolated"], true, "{m}");
        let actions = g["actions"].as_array().unwrap();
        assert_eq!(actions.len(), 1, "{m}");
        assert_eq!(g["lastChangeActionId"], actions[0]["id"], "{m}");
        assert_eq!(g["lastChange"], actions[0]["creationDateTimeUtc"], "{m}");
        assert_eq!(g["openActions"], 0);
        seeded.insert(m, actions[0]["id"].as_str().unwrap().to_string());
    }
    let g = sim.ground_truth(F_AAD_RELEASED).await;
    assert_eq!(g["isolated"], false);
    assert_eq!(g["actions"].as_array().unwrap().len(), 2);
    let released_isolate = g["actions"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(g["actions"][0]["requestor"], AAD);
    assert_eq!(sim.ground_truth(F_PLAIN).await["isolated"], false);
    assert_eq!(sim.ground_truth(F_PERSON1).await["isolated"], true);

    // Nothing so far was a call.
    assert_eq!(api_calls(&sim).await, 0);
    let tok = sim.token().await;
    let r = sim
        .get(
            &format!(
                "/api/machineactions?$filter={}",
                enc(&format!("requestor eq '{AAD}'"))
            ),
            &tok,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let list = r.body["value"].as_array().unwrap();
    // Exactly the seeded attack-disruption actions (also the one since released), oldest first.
    let got: Vec<&str> = list.iter().map(|a| a["id"].as_str().unwrap()).collect();
    assert_eq!(
        got,
        vec![
            released_isolate.as_str(),
            &seeded[F_AAD1],
            &seeded[F_AAD2],
            &seeded[F_AAD3]
        ]
    );
    let times: Vec<&str> = list
        .iter()
        .map(|a| a["creationDateTimeUtc"].as_str().unwrap())
        .collect();
    assert_eq!(
        times,
        vec![
            "2026-12-01T09:00:00.0000000Z",
            "2026-12-01T10:00:00.0000000Z",
            "2026-12-01T10:00:05.5000000Z",
            "2026-12-02T00:00:00.0000000Z"
        ]
    );
    for a in list {
        assert_eq!(a["type"], "Isolate");
        assert_eq!(a["status"], "Succeeded");
        assert_eq!(a["requestor"], AAD);
        assert_eq!(a["requestSource"], AAD_SOURCE);
        assert_eq!(a["lastUpdateDateTimeUtc"], a["creationDateTimeUtc"]);
        assert!(is_guid(a["id"].as_str().unwrap()));
    }
    let first = &list[1];
    assert_eq!(first["machineId"], F_AAD1);
    assert_eq!(first["computerDnsName"], "srv-01.contoso.local");
    assert_eq!(
        first["requestorComment"],
        "Contained by automatic attack disruption"
    );
    assert_eq!(first["scope"], "Full");
    assert_eq!(list[2]["scope"], "Selective");
    assert_eq!(list[2]["requestorComment"], format!("Isolated by {AAD}"));

    // Combined with other filters, ordered and paged like any action.
    let r = sim
        .get(
            &format!(
                "/api/machineactions?$filter={}&$orderby=creationDateTimeUtc%20desc&$top=2&$count=true",
                enc(&format!(
                    "requestor eq '{AAD}' and type eq 'Isolate' and creationDateTimeUtc ge 2026-12-01T10:00:00Z"
                ))
            ),
            &tok,
        )
        .await;
    assert_eq!(r.body["@odata.count"], 3);
    let got: Vec<&str> = r.body["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, vec![seeded[F_AAD3].as_str(), &seeded[F_AAD2]]);
    // Two calls, both admitted on a budget of two: the seeded actions used none.
    assert_eq!(api_calls(&sim).await, 2);

    // Every action names its source: the default for a seeded person is Portal; the app's
    // own calls are PublicApi.
    let all = sim.admin_get("actions").await;
    let sources: std::collections::BTreeMap<String, String> = all["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["requestor"].as_str().unwrap().to_string(),
                a["requestSource"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(sources["soc-analyst@contoso.com"], "Portal");
    assert_eq!(sources["alice@contoso.com"], "Portal");
    assert_eq!(sources[AAD], AAD_SOURCE);
    sim.admin_post("settings", json!({"quotaPerMinute": 0}))
        .await;
    let r = isolate(&sim, &tok, F_PLAIN).await;
    assert_eq!(r.body["requestSource"], "PublicApi");
    // An isolate-external may name another source.
    let r = sim
        .send(
            "POST",
            &format!("/sim/machines/{F_PERSON2}/unisolate-external"),
            None,
            Some(json!({"requestSource": "Automation", "immediate": true})),
        )
        .await;
    assert_eq!(r.body["requestSource"], "Automation");

    // A reset brings the seeded actions back with the same ids, and only them.
    sim.admin_post("reset", json!({})).await;
    let r = sim
        .get(
            &format!(
                "/api/machineactions?$filter={}",
                enc(&format!("requestor eq '{AAD}'"))
            ),
            &sim.token().await,
        )
        .await;
    assert_eq!(
        ids(&r),
        set(&[
            &released_isolate,
            &seeded[F_AAD1],
            &seeded[F_AAD2],
            &seeded[F_AAD3]
        ])
    );
    assert_eq!(sim.ground_truth(F_AAD_RELEASED).await["isolated"], true);
    assert_eq!(
        sim.admin_get("actions").await["value"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
}

#[tokio::test]
async fn isolated_by_ids_follow_the_rng_seed() {
    async fn aad_ids(sim: &Sim) -> Vec<String> {
        sim.admin_get("actions").await["value"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["id"].as_str().unwrap().to_string())
            .collect()
    }
    let (a, _fa) = fleet(&["--rng-seed", "5"]);
    let (b, _fb) = fleet(&["--rng-seed", "5"]);
    let (c, _fc) = fleet(&["--rng-seed", "6"]);
    let ia = aad_ids(&a).await;
    assert_eq!(ia.len(), 5);
    assert_eq!(ia, aad_ids(&b).await);
    assert_ne!(ia, aad_ids(&c).await);
}

#[tokio::test]
async fn post_sim_machines_takes_isolated_by() {
    let (sim, _f) = fleet(&[]);
    let r = sim
        .send(
            "POST",
            "/sim/machines",
            None,
            Some(json!({"machines": [{
                "id": "e1000000000000000000000000000000000000e1",
                "computerDnsName": "late.contoso.local",
                "isolatedBy": {"requestor": AAD, "requestSource": AAD_SOURCE, "at": "2026-11-30T23:59:59Z"}
            }]})),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let g = sim
        .ground_truth("e1000000000000000000000000000000000000e1")
        .await;
    assert_eq!(g["isolated"], true);
    assert_eq!(
        g["actions"][0]["creationDateTimeUtc"],
        "2026-11-30T23:59:59.0000000Z"
    );
    assert_eq!(g["actions"][0]["requestSource"], AAD_SOURCE);
    // Without `at` it is now.
    let r = sim
        .send(
            "POST",
            "/sim/machines",
            None,
            Some(json!({"machines": [{"computerDnsName": "now.contoso.local", "isolatedBy": {"requestor": "x@contoso.com"}}]})),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let id = r.body["added"][0]["id"].as_str().unwrap().to_string();
    let g = sim.ground_truth(&id).await;
    assert_eq!(g["actions"][0]["creationDateTimeUtc"], sim.now().await);
    assert_eq!(g["actions"][0]["requestSource"], "Portal");

    let before = sim.machine_ids().await.len();
    for bad in [
        json!({"requestor": AAD, "source": "x"}),
        json!({"requestor": AAD, "at": "yesterday"}),
        json!({"requestor": AAD, "at": "2999-01-01T00:00:00Z"}),
        json!({"requestor": ""}),
        json!({"comment": "no requestor"}),
        json!({"requestor": AAD, "isolationType": "Partial"}),
    ] {
        let r = sim
            .send(
                "POST",
                "/sim/machines",
                None,
                Some(json!({"machines": [{"computerDnsName": "bad.contoso.local", "isolatedBy": bad}]})),
            )
            .await;
        assert_error(&r, 400, "InvalidInput");
    }
    let r = sim
        .send(
            "POST",
            "/sim/machines",
            None,
            Some(json!({"machines": [{"computerDnsName": "bad.contoso.local", "isolated": false, "isolatedBy": {"requestor": AAD}}]})),
        )
        .await;
    assert_error(&r, 400, "InvalidInput");
    assert_eq!(sim.machine_ids().await.len(), before);
}

#[tokio::test]
async fn machine_filters_for_fleet_selection() {
    let (sim, _f) = fleet(&["--page-size", "2"]);
    let tok = sim.token().await;
    let machine = |id: &'static str| {
        let sim = &sim;
        let tok = &tok;
        async move { sim.get(&format!("/api/machines/{id}"), tok).await.body }
    };
    // Stable group ids: the same name has the same numeric id.
    let servers = machine(F_AAD1).await["rbacGroupId"].clone();
    let laptops = machine(F_AAD3).await["rbacGroupId"].clone();
    assert!(servers.is_i64() && laptops.is_i64(), "{servers} {laptops}");
    assert_ne!(servers, laptops);
    assert_eq!(machine(F_PLAIN).await["rbacGroupId"], servers);
    assert_eq!(machine(F_AAD2).await["rbacGroupName"], "Servers");
    assert_eq!(machine(F_SOC_SEEDED).await["rbacGroupId"], laptops);
    assert_eq!(machine(F_PERSON2).await["rbacGroupId"], 0);
    assert_eq!(machine(F_PERSON2).await["rbacGroupName"], "UnassignedGroup");

    // Follows nextLink to the end and returns every id found.
    let all_pages = |query: String| {
        let sim = &sim;
        let tok = &tok;
        async move {
            let mut url = sim.url(&query);
            let mut seen = BTreeSet::new();
            loop {
                let r = Sim::into_resp(sim.client.get(&url).bearer_auth(tok).send().await.unwrap())
                    .await;
                assert_eq!(r.status, 200, "{url}: {:?}", r.body);
                assert!(r.body["value"].as_array().unwrap().len() <= 2);
                for m in r.body["value"].as_array().unwrap() {
                    assert!(seen.insert(m["id"].as_str().unwrap().to_string()));
                }
                match r.body["@odata.nextLink"].as_str() {
                    Some(n) => url = n.to_string(),
                    None => break seen,
                }
            }
        }
    };
    let q = |f: &str| format!("/api/machines?$filter={}&$top=10000", enc(f));
    let cases: Vec<(String, Vec<&str>)> = vec![
        (format!("id in ('{F_AAD1}','{F_PERSON1}', '{F_PLAIN}')"), vec![F_AAD1, F_PERSON1, F_PLAIN]),
        (format!("id eq '{F_AAD2}'"), vec![F_AAD2]),
        ("computerDnsName in ('srv-01.contoso.local', 'ws-07.contoso.local', 'nope')".into(), vec![F_AAD1, F_PERSON2]),
        ("machineTags/any(tag: tag eq 'prod') and machineTags/any(tag: tag eq 'web')".into(), vec![F_AAD1, F_PERSON1]),
        ("machineTags/any(tag: tag eq 'prod') or machineTags/any(tag: tag eq 'web')".into(), vec![F_AAD1, F_AAD2, F_AAD3, F_PERSON1]),
        (format!("rbacGroupId eq {servers}"), vec![F_AAD1, F_AAD2, F_PLAIN]),
        (format!("rbacGroupId in ({servers}, {laptops})"), vec![F_AAD1, F_AAD2, F_AAD3, F_AAD_RELEASED, F_SOC_SEEDED, F_PLAIN]),
        (format!("rbacGroupId eq {laptops} and machineTags/any(tag: tag eq 'web')"), vec![F_AAD3]),
        ("rbacGroupId eq 0".into(), vec![F_PERSON1, F_PERSON2]),
        ("rbacGroupId eq 999".into(), vec![]),
        ("version eq '23H2' and deviceValue eq 'Normal' and exposureLevel eq 'Low' and riskScore eq 'None' and aadDeviceId eq null and onboardingStatus eq 'Onboarded'".into(),
         vec![F_AAD1, F_AAD2, F_AAD3, F_AAD_RELEASED, F_SOC_SEEDED, F_PERSON1, F_PERSON2, F_PLAIN]),
    ];
    for (filter, expected) in cases {
        assert_eq!(
            all_pages(q(&filter)).await,
            set(&expected),
            "filter {filter}"
        );
    }
    let ip = machine(F_PLAIN).await["lastIpAddress"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        all_pages(q(&format!("lastIpAddress eq '{ip}'")))
            .await
            .contains(F_PLAIN)
    );

    // Not documented as filterable: refused like the undocumented action properties, while
    // still present in every machine.
    for filter in [
        "rbacGroupName eq 'Servers'",
        "rbacGroupName in ('Servers')",
        "isPotentialDuplication eq null",
        "firstSeen ge 2026-01-01T00:00:00Z",
    ] {
        let r = sim
            .get(&format!("/api/machines?$filter={}", enc(filter)), &tok)
            .await;
        assert_error(&r, 400, "ODataError");
        assert!(
            message(&r).contains("is not supported"),
            "{filter}: {:?}",
            r.body
        );
    }
    let action_refusal = sim
        .get(
            &format!(
                "/api/machineactions?$filter={}",
                enc("requestSource eq 'Portal'")
            ),
            &tok,
        )
        .await;
    assert_error(&action_refusal, 400, "ODataError");
    let machine_refusal = sim
        .get(
            &format!("/api/machines?$filter={}", enc("rbacGroupName eq 'x'")),
            &tok,
        )
        .await;
    assert_eq!(
        message(&action_refusal).replace("requestSource", "P"),
        message(&machine_refusal).replace("rbacGroupName", "P")
    );
    assert_eq!(machine(F_AAD1).await["rbacGroupName"], "Servers");
    assert_error(
        &sim.get("/api/machines?$top=10001", &tok).await,
        400,
        "ODataError",
    );
}

// ---------------------------------------------------------------- tenants

/// The default tenant answers for this id (any id that is not named).
const CONTOSO: &str = "contoso.onmicrosoft.com";
const FABRIKAM: &str = "fabrikam.onmicrosoft.com";
const NORTHWIND: &str = "0b7c1d2e-3f40-4a5b-8c6d-7e8f90a1b2c3";
/// The default tenant's machine; fabrikam has a machine of the same name.
const T_CONTOSO: &str = "c1000000000000000000000000000000000000c1";
const T_FABRIKAM: &str = "f1000000000000000000000000000000000000f1";
const T_NORTHWIND: &str = "a1000000000000000000000000000000000000a1";

/// The default tenant (app `operator`), fabrikam (the same multi-tenant client id `operator`
/// with its own secret, another app, a seeded machine named like the default tenant's and two
/// generated ones) and northwind (its own app, one machine, a foreign load on its actions list).
const TENANTS_SEED: &str = r#"
machines:
  - id: "c1000000000000000000000000000000000000c1"
    computerDnsName: ws-001.contoso.local
apps:
  - {clientId: operator, clientSecret: contoso-secret, roles: [Machine.Isolate, Machine.Read.All]}
tenants:
  - tenantId: fabrikam.onmicrosoft.com
    apps:
      - {clientId: operator, clientSecret: fabrikam-secret, roles: [Machine.Isolate, Machine.Read.All]}
      - {clientId: fabrikam-only, clientSecret: f, roles: [Machine.Read.All]}
    machines:
      - id: "f1000000000000000000000000000000000000f1"
        computerDnsName: ws-001.contoso.local
    generate: {count: 2, domain: fabrikam.local}
  - tenantId: 0B7C1D2E-3F40-4A5B-8C6D-7E8F90A1B2C3
    apps:
      - {clientId: northwind-op, clientSecret: n, roles: [Machine.Isolate, Machine.Read.All]}
    machines:
      - id: "a1000000000000000000000000000000000000a1"
        computerDnsName: nw-001.northwind.local
    foreignLoad: [{api: machineactions-list, perMinute: 2, pattern: burst}]
"#;

/// A frozen simulator with the three tenants of `TENANTS_SEED`.
fn three_tenants(args: &[&str]) -> (Sim, tempfile::NamedTempFile) {
    let f = seed_file(TENANTS_SEED);
    let path = f.path().to_str().expect("utf8 path").to_string();
    let mut all = vec!["--seed", path.as_str()];
    all.extend_from_slice(args);
    (frozen(&all), f)
}

/// Tokens of the three tenants' operator apps: (contoso, fabrikam, northwind).
async fn tenant_tokens(sim: &Sim) -> (String, String, String) {
    (
        sim.token_in(CONTOSO, "operator", "contoso-secret").await,
        sim.token_in(FABRIKAM, "operator", "fabrikam-secret").await,
        sim.token_in(NORTHWIND, "northwind-op", "n").await,
    )
}

fn token_form<'a>(client_id: &'a str, secret: &'a str) -> [(&'a str, &'a str); 4] {
    [
        ("grant_type", "client_credentials"),
        ("client_id", client_id),
        ("client_secret", secret),
        ("scope", SCOPE),
    ]
}

#[tokio::test]
async fn a_tenant_sees_and_changes_only_its_own_machines_and_actions() {
    let (sim, _f) = three_tenants(&[]);
    let (tc, tf, tn) = tenant_tokens(&sim).await;
    let listed = |tok: String| {
        let sim = &sim;
        async move { ids(&sim.get("/api/machines", &tok).await) }
    };
    assert_eq!(listed(tc.clone()).await, set(&[T_CONTOSO]));
    let fabrikam = listed(tf.clone()).await;
    assert_eq!(fabrikam.len(), 3);
    assert!(fabrikam.contains(T_FABRIKAM) && !fabrikam.contains(T_CONTOSO));
    assert_eq!(listed(tn.clone()).await, set(&[T_NORTHWIND]));
    // The same name in two tenants: each finds its own.
    let by_name = format!(
        "/api/machines?$filter={}",
        enc("computerDnsName eq 'ws-001.contoso.local'")
    );
    assert_eq!(ids(&sim.get(&by_name, &tf).await), set(&[T_FABRIKAM]));
    assert_eq!(ids(&sim.get(&by_name, &tc).await), set(&[T_CONTOSO]));

    // Another tenant's machine is simply not found, and nothing happens to it.
    assert_error(
        &sim.get(&format!("/api/machines/{T_CONTOSO}"), &tf).await,
        404,
        "ResourceNotFound",
    );
    assert_error(
        &isolate(&sim, &tf, T_CONTOSO).await,
        404,
        "ResourceNotFound",
    );
    assert_error(
        &unisolate(&sim, &tn, T_FABRIKAM).await,
        404,
        "ResourceNotFound",
    );
    assert_eq!(sim.ground_truth(T_CONTOSO).await["actions"], json!([]));
    assert_eq!(
        sim.ground_truth_in(FABRIKAM, T_FABRIKAM).await["actions"],
        json!([])
    );

    // An action is seen and cancelled only in its tenant.
    let a = action_id(&isolate(&sim, &tc, T_CONTOSO).await);
    assert_error(
        &sim.get(&format!("/api/machineactions/{a}"), &tf).await,
        404,
        "ResourceNotFound",
    );
    let cancel = |tok: String| {
        let (sim, a) = (&sim, a.clone());
        async move {
            sim.post(
                &format!("/api/machineactions/{a}/cancel"),
                &tok,
                json!({"Comment": "not yours"}),
            )
            .await
        }
    };
    assert_error(&cancel(tf.clone()).await, 404, "ResourceNotFound");
    assert_eq!(ids(&sim.get("/api/machineactions", &tf).await), set(&[]));
    assert_eq!(ids(&sim.get("/api/machineactions", &tc).await), set(&[&a]));
    assert_eq!(action_status(&sim, &tc, &a).await, "Pending");
    sim.advance(60.0).await;
    assert_eq!(sim.ground_truth(T_CONTOSO).await["isolated"], true);
    assert_eq!(
        sim.ground_truth_in(FABRIKAM, "ws-001.contoso.local").await["isolated"],
        false
    );

    // The admin API: ?tenant= (any case) addresses a named tenant, nothing the default one.
    assert_eq!(
        sim.machine_ids_in("FABRIKAM.onmicrosoft.com").await.len(),
        3
    );
    assert_eq!(sim.machine_ids().await, [T_CONTOSO]);
    let none = sim
        .send(
            "GET",
            &format!("/sim/machines/{T_CONTOSO}?tenant={FABRIKAM}"),
            None,
            None,
        )
        .await;
    assert_error(&none, 404, "ResourceNotFound");
    let unknown = sim
        .send("GET", "/sim/machines?tenant=nowhere.example", None, None)
        .await;
    assert_error(&unknown, 404, "ResourceNotFound");
    assert!(message(&unknown).contains("no tenant nowhere.example"));
    // A person isolates in fabrikam's portal: fabrikam's API shows it, the others do not.
    let ext = sim
        .admin_post_in(
            FABRIKAM,
            &format!("machines/{T_FABRIKAM}/isolate-external"),
            json!({"immediate": true}),
        )
        .await;
    let ext_id = ext["id"].as_str().unwrap().to_string();
    assert_eq!(
        ids(&sim.get("/api/machineactions", &tf).await),
        set(&[&ext_id])
    );
    assert_eq!(ids(&sim.get("/api/machineactions", &tc).await), set(&[&a]));
    assert_eq!(
        sim.admin_get_in(FABRIKAM, "actions").await["value"][0]["id"],
        json!(ext_id)
    );
    assert_eq!(sim.admin_get("actions").await["value"][0]["id"], json!(a));
    assert_eq!(
        sim.ground_truth_in(FABRIKAM, T_FABRIKAM).await["isolated"],
        true
    );
    let stranger = sim
        .send(
            "POST",
            &format!("/sim/machines/{T_FABRIKAM}/isolate-external"),
            None,
            Some(json!({})),
        )
        .await;
    assert_error(&stranger, 404, "ResourceNotFound");
}

#[tokio::test]
async fn a_tenants_token_endpoint_signs_in_only_its_apps_and_its_tokens_carry_the_tenant() {
    let (sim, _f) = three_tenants(&[]);
    let not_found_in = |r: &Resp, client: &str, dir: &str| {
        assert_eq!(
            (r.status, r.body["error"].as_str()),
            (400, Some("unauthorized_client")),
            "{:?}",
            r.body
        );
        assert_eq!(r.body["error_codes"], json!([700016]));
        let d = r.body["error_description"].as_str().unwrap();
        assert!(
            d.starts_with(&format!(
                "AADSTS700016: Application with identifier '{client}' was not found in the directory '{dir}'."
            )),
            "{d}"
        );
    };
    // Another tenant's app, at a named tenant's URL and at the default tenant's.
    let r = sim
        .token_request(
            &common::sim::token_path(FABRIKAM),
            &token_form("northwind-op", "n"),
        )
        .await;
    not_found_in(&r, "northwind-op", FABRIKAM);
    let r = sim
        .token_request(
            &common::sim::token_path(CONTOSO),
            &token_form("fabrikam-only", "f"),
        )
        .await;
    not_found_in(&r, "fabrikam-only", CONTOSO);
    // The default tenant's app is not in a named tenant either.
    let r = sim
        .token_request(
            &common::sim::token_path(NORTHWIND),
            &token_form("operator", "contoso-secret"),
        )
        .await;
    not_found_in(&r, "operator", NORTHWIND);
    // The same client id in two tenants: each tenant has its own secret.
    let r = sim
        .token_request(
            &common::sim::token_path(FABRIKAM),
            &token_form("operator", "contoso-secret"),
        )
        .await;
    assert_eq!(
        (r.status, r.body["error_codes"].clone()),
        (401, json!([7000215]))
    );

    // A token says its tenant as Entra ID's do (`tid`, `iss`); a named tenant's id as configured
    // whatever the case of the URL, the default tenant's the id it was asked for at.
    let tf = sim
        .token_in("Fabrikam.OnMicrosoft.com", "operator", "fabrikam-secret")
        .await;
    let claims = common::sim::jwt_claims(&tf);
    assert_eq!(claims["tid"], FABRIKAM);
    assert_eq!(
        claims["iss"],
        format!("https://sts.windows.net/{FABRIKAM}/")
    );
    assert_eq!(claims["appid"], "operator");
    assert_eq!(claims["aud"], "https://api.securitycenter.microsoft.com");
    assert_eq!(
        claims["roles"],
        json!(["Machine.Isolate", "Machine.Read.All"])
    );
    let tn = sim
        .token_in(&NORTHWIND.to_uppercase(), "northwind-op", "n")
        .await;
    assert_eq!(
        common::sim::jwt_claims(&tn)["tid"],
        NORTHWIND.to_uppercase(),
        "as configured in the seed"
    );
    let tc = sim.token_in(CONTOSO, "operator", "contoso-secret").await;
    assert_eq!(common::sim::jwt_claims(&tc)["tid"], CONTOSO);
    let elsewhere = sim
        .token_in("any-other.example", "operator", "contoso-secret")
        .await;
    assert_eq!(
        common::sim::jwt_claims(&elsewhere)["tid"],
        "any-other.example"
    );
    assert_eq!(sim.get("/api/machines", &elsewhere).await.status, 200);
    // v1 works per tenant too.
    let r = sim
        .token_request(
            &format!("/{FABRIKAM}/oauth2/token"),
            &[
                ("grant_type", "client_credentials"),
                ("client_id", "fabrikam-only"),
                ("client_secret", "f"),
                ("resource", "https://api.securitycenter.microsoft.com"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let v1 = r.body["access_token"].as_str().unwrap();
    assert_eq!(ids(&sim.get("/api/machines", v1).await).len(), 3);

    // Token requests are logged in the tenant of their URL, with its id.
    let tenants_of = |calls: &[Value]| -> Vec<(String, u64)> {
        calls
            .iter()
            .filter(|c| c["api"] == "token")
            .map(|c| {
                (
                    c["tenant"].as_str().unwrap().to_string(),
                    c["status"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(
        tenants_of(&sim.admin_calls_in(FABRIKAM).await),
        [
            (FABRIKAM.to_string(), 400),
            (FABRIKAM.into(), 401),
            (FABRIKAM.into(), 200),
            (FABRIKAM.into(), 200)
        ]
    );
    let upper = NORTHWIND.to_uppercase();
    assert_eq!(
        tenants_of(&sim.admin_calls_in(NORTHWIND).await),
        [(upper.clone(), 400), (upper, 200)]
    );
    assert_eq!(
        tenants_of(&sim.admin_calls().await),
        [
            (CONTOSO.to_string(), 400),
            (CONTOSO.into(), 200),
            ("any-other.example".into(), 200)
        ]
    );
}

#[tokio::test]
async fn quota_is_counted_per_tenant_and_app() {
    let (sim, _f) = three_tenants(&["--quota-per-minute", "2"]);
    let (tc, tf, tn) = tenant_tokens(&sim).await;
    for _ in 0..2 {
        assert_eq!(sim.get("/api/machines", &tf).await.status, 200);
    }
    let r = sim.get("/api/machines", &tf).await;
    assert_error(&r, 429, "TooManyRequests");
    // The same client id in the default tenant, and another tenant's app: untouched budgets.
    for tok in [&tc, &tc, &tn, &tn] {
        assert_eq!(sim.get("/api/machines", tok).await.status, 200);
    }
    let throttled = |stats: Value| {
        (
            stats["apis"]["machines-list"]["calls"].as_u64().unwrap(),
            stats["apis"]["machines-list"]["throttled"]
                .as_u64()
                .unwrap(),
            stats["totalCalls"].as_u64().unwrap(),
        )
    };
    // 3 list calls and 1 token request each.
    assert_eq!(throttled(sim.admin_stats_in(FABRIKAM).await), (3, 1, 4));
    assert_eq!(throttled(sim.admin_stats().await), (2, 0, 3));
    assert_eq!(throttled(sim.admin_stats_in(NORTHWIND).await), (2, 0, 3));
    // Fabrikam's other app has its own budget in fabrikam.
    let other = sim.token_in(FABRIKAM, "fabrikam-only", "f").await;
    assert_eq!(sim.get("/api/machines", &other).await.status, 200);
    sim.advance(60.0).await;
    assert_eq!(sim.get("/api/machines", &tf).await.status, 200);
}

#[tokio::test]
async fn foreign_load_spends_only_its_tenants_quota() {
    let (sim, _f) = three_tenants(&["--quota-per-minute", "2"]);
    let (tc, tf, tn) = tenant_tokens(&sim).await;
    // Northwind's seed load takes its whole actions-list budget at each minute's start.
    assert_error(
        &sim.get("/api/machineactions", &tn).await,
        429,
        "TooManyRequests",
    );
    assert_eq!(sim.get("/api/machineactions", &tc).await.status, 200);
    assert_eq!(sim.get("/api/machineactions", &tf).await.status, 200);

    // Fabrikam flooded at run time; the others keep their figures.
    let set_load = sim
        .admin_post_in(
            FABRIKAM,
            "foreign-load",
            json!({"load": [{"api": "machines-list", "perMinute": 2, "pattern": "burst"}]}),
        )
        .await;
    assert_eq!(set_load["load"][0]["api"], "machines-list");
    assert_error(&sim.get("/api/machines", &tf).await, 429, "TooManyRequests");
    assert_eq!(sim.get("/api/machines", &tc).await.status, 200);
    assert_eq!(sim.get("/api/machines", &tn).await.status, 200);
    assert_eq!(sim.admin_get("foreign-load").await["load"], json!([]));
    assert_eq!(
        sim.admin_get_in(NORTHWIND, "foreign-load").await["load"][0]["api"],
        "machineactions-list"
    );
    let admitted = |stats: Value, api: &str| foreign(&stats, api);
    // Both of fabrikam's apps get the load (2 admitted each).
    assert_eq!(
        admitted(sim.admin_stats_in(FABRIKAM).await, "machines-list"),
        (4, 0)
    );
    assert_eq!(
        admitted(sim.admin_stats_in(NORTHWIND).await, "machineactions-list"),
        (2, 0)
    );
    assert_eq!(admitted(sim.admin_stats().await, "machines-list"), (0, 0));
    // An app of another tenant cannot be the target of a tenant's load.
    let r = sim
        .send(
            "POST",
            &format!("/sim/foreign-load?tenant={FABRIKAM}"),
            None,
            Some(json!({"load": [{"api": "isolate", "perMinute": 1, "app": "northwind-op"}]})),
        )
        .await;
    assert_error(&r, 400, "InvalidInput");
}

#[tokio::test]
async fn every_call_record_names_the_tenant_of_its_token() {
    let (sim, _f) = three_tenants(&["--token-lifetime", "60"]);
    let (tc, tf, tn) = tenant_tokens(&sim).await;
    let first = sim.admin_calls_in("*").await.last().unwrap()["seq"]
        .as_u64()
        .unwrap();
    assert_eq!(sim.get("/api/machines", &tc).await.status, 200);
    assert_eq!(sim.get("/api/machines", &tf).await.status, 200);
    // Fabrikam's token on a default-tenant machine: a call of fabrikam, 404.
    assert_eq!(
        sim.get(&format!("/api/machines/{T_CONTOSO}"), &tf)
            .await
            .status,
        404
    );
    assert_eq!(isolate(&sim, &tn, T_NORTHWIND).await.status, 201);
    // Calls no token attributes go to the default tenant's log, with tenant null.
    assert_eq!(sim.get("/api/machines", "made-up").await.status, 401);
    assert_eq!(sim.send("GET", "/nowhere", None, None).await.status, 404);
    sim.advance(60.0).await;
    // An expired token is still recognised: its tenant's 401.
    assert_eq!(sim.get("/api/machines", &tf).await.status, 401);

    let view = |calls: Vec<Value>| -> Vec<(Value, Value, String, u64)> {
        calls
            .into_iter()
            .filter(|c| c["seq"].as_u64().unwrap() > first)
            .map(|c| {
                (
                    c["tenant"].clone(),
                    c["app"].clone(),
                    c["path"].as_str().unwrap().to_string(),
                    c["status"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(
        view(sim.admin_calls_in(FABRIKAM).await),
        [
            (
                json!(FABRIKAM),
                json!("operator"),
                "/api/machines".into(),
                200
            ),
            (
                json!(FABRIKAM),
                json!("operator"),
                format!("/api/machines/{T_CONTOSO}"),
                404
            ),
            (
                json!(FABRIKAM),
                json!("operator"),
                "/api/machines".into(),
                401
            ),
        ]
    );
    assert_eq!(
        view(sim.admin_calls_in(NORTHWIND).await),
        [(
            json!(NORTHWIND.to_uppercase()),
            json!("northwind-op"),
            format!("/api/machines/{T_NORTHWIND}/isolate"),
            201
        )]
    );
    assert_eq!(
        view(sim.admin_calls().await),
        [
            (
                json!(CONTOSO),
                json!("operator"),
                "/api/machines".into(),
                200
            ),
            (Value::Null, Value::Null, "/api/machines".into(), 401),
            (Value::Null, Value::Null, "/nowhere".into(), 404),
        ]
    );
    // `*`: every tenant's calls in arrival order, one sequence.
    let all = sim.admin_calls_in("*").await;
    let seqs: Vec<u64> = all.iter().map(|c| c["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(
        view(all).iter().map(|c| c.2.clone()).collect::<Vec<_>>(),
        [
            "/api/machines".to_string(),
            "/api/machines".into(),
            format!("/api/machines/{T_CONTOSO}"),
            format!("/api/machines/{T_NORTHWIND}/isolate"),
            "/api/machines".into(),
            "/nowhere".into(),
            "/api/machines".into(),
        ]
    );
    // `since` and `api` combine with `tenant`.
    let since = sim
        .admin_get_in(FABRIKAM, &format!("calls?since={}&api=machines-get", first))
        .await;
    assert_eq!(since["calls"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn tenants_are_created_replaced_reset_and_deleted_at_run_time() {
    let sim = frozen(&["--machines", "1"]);
    const TAILSPIN: &str = "tailspin.example";
    let tenant = json!({
        "tenantId": TAILSPIN,
        "apps": [{"clientId": "tailspin-op", "clientSecret": "t",
                  "roles": ["Machine.Isolate", "Machine.Read.All"]}],
        "generate": {"count": 300, "offlineRatio": 0.1},
    });
    let r = sim
        .send("POST", "/sim/tenants", None, Some(tenant.clone()))
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["tenantId"], TAILSPIN);
    assert_eq!(r.body["machines"], 300);
    assert_eq!(r.body["apps"][0]["clientId"], "tailspin-op");
    assert!(r.body["apps"][0].get("clientSecret").is_none());
    let list = sim.admin_get("tenants").await["tenants"].clone();
    assert_eq!(list[0]["tenantId"], Value::Null, "the default tenant first");
    assert_eq!(list[0]["apps"][0]["clientId"], CLIENT_ID);
    assert_eq!(list[1]["tenantId"], TAILSPIN);
    assert_eq!(
        sim.admin_get(&format!("tenants/{TAILSPIN}")).await["machines"],
        300
    );

    let tok = sim.token_in(TAILSPIN, "tailspin-op", "t").await;
    let machines = sim.machine_ids_in(TAILSPIN).await;
    assert_eq!(machines.len(), 300);
    let r = sim.get("/api/machines?$count=true", &tok).await;
    assert_eq!(r.body["@odata.count"], 300);
    let truth = sim.admin_get_in(TAILSPIN, "machines").await;
    let offline = truth["machines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["behaviour"] == "offline")
        .count();
    assert!((10..60).contains(&offline), "{offline} offline of 300");
    action_id(&isolate(&sim, &tok, &machines[0]).await);
    let default_tok = sim.token().await;
    let default_machine = sim.machine_ids().await[0].clone();
    action_id(&isolate(&sim, &default_tok, &default_machine).await);

    // Machines added at run time get the tenant's generated names.
    let added = sim
        .admin_post_in(TAILSPIN, "machines", json!({"count": 1}))
        .await;
    assert_eq!(
        added["added"][0]["computerDnsName"],
        "host-0301.contoso.local"
    );

    // Resetting one tenant leaves the others alone; its tokens are revoked.
    sim.admin_post_in(TAILSPIN, "reset", json!({})).await;
    assert_eq!(
        sim.admin_get_in(TAILSPIN, "actions").await["value"],
        json!([])
    );
    assert_eq!(sim.machine_ids_in(TAILSPIN).await, machines);
    assert_eq!(sim.admin_calls_in(TAILSPIN).await, Vec::<Value>::new());
    assert_error(&sim.get("/api/machines", &tok).await, 401, "Unauthorized");
    assert_eq!(
        sim.admin_get("actions").await["value"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // A full reset keeps the tenant, as created.
    let tok = sim.token_in(TAILSPIN, "tailspin-op", "t").await;
    action_id(&isolate(&sim, &tok, &machines[1]).await);
    sim.admin_post("reset", json!({})).await;
    assert_eq!(sim.machine_ids_in(TAILSPIN).await, machines);
    assert_eq!(
        sim.admin_get_in(TAILSPIN, "actions").await["value"],
        json!([])
    );
    assert_eq!(sim.admin_get("actions").await["value"], json!([]));

    // Replacing starts it fresh: new apps, machines, and earlier tokens revoked.
    let tok = sim.token_in(TAILSPIN, "tailspin-op", "t").await;
    let replaced = json!({
        "tenantId": "TAILSPIN.example",
        "apps": [{"clientId": "tailspin-op", "clientSecret": "rotated", "roles": ["Machine.Read.All"]}],
        "machines": [{"computerDnsName": "only.tailspin.example"}],
    });
    let r = sim.send("POST", "/sim/tenants", None, Some(replaced)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["machines"], 1);
    assert_error(&sim.get("/api/machines", &tok).await, 401, "Unauthorized");
    let r = sim
        .token_request(
            &common::sim::token_path(TAILSPIN),
            &token_form("tailspin-op", "t"),
        )
        .await;
    assert_eq!(r.status, 401);
    let tok = sim.token_in(TAILSPIN, "tailspin-op", "rotated").await;
    assert_eq!(
        sim.ground_truth_in(TAILSPIN, "only.tailspin.example").await["computerDnsName"],
        "only.tailspin.example"
    );

    // Deleted: its URL is the default tenant's again, its tokens are revoked.
    let r = sim
        .send("DELETE", &format!("/sim/tenants/{TAILSPIN}"), None, None)
        .await;
    assert_eq!(
        (r.status, r.body["deleted"].clone()),
        (200, json!(TAILSPIN))
    );
    assert_error(&sim.get("/api/machines", &tok).await, 401, "Unauthorized");
    let r = sim
        .token_request(
            &common::sim::token_path(TAILSPIN),
            &token_form("tailspin-op", "rotated"),
        )
        .await;
    assert_eq!(r.body["error_codes"], json!([700016]));
    let r = sim
        .send(
            "GET",
            &format!("/sim/machines?tenant={TAILSPIN}"),
            None,
            None,
        )
        .await;
    assert_error(&r, 404, "ResourceNotFound");
    let r = sim
        .send("DELETE", &format!("/sim/tenants/{TAILSPIN}"), None, None)
        .await;
    assert_error(&r, 404, "ResourceNotFound");

    // Bad tenants are refused with the reason.
    for (body, says) in [
        (
            json!({"tenantId": "x.example", "apps": []}),
            "needs at least one app",
        ),
        (json!({"tenantId": "x.example"}), "missing field `apps`"),
        (
            json!({"tenantId": "x/y", "apps": [{"clientId": "a"}]}),
            "is not a GUID or domain name",
        ),
        (
            json!({"tenantId": "x.example", "apps": [{"clientId": "a"}], "count": 3}),
            "unknown field `count`",
        ),
        (
            json!({"tenantId": "x.example", "apps": [{"clientId": "a"}], "generate": {"count": 100001}}),
            "generate.count must be 0..=100000",
        ),
    ] {
        let r = sim
            .send("POST", "/sim/tenants", None, Some(body.clone()))
            .await;
        assert_error(&r, 400, "InvalidInput");
        assert!(message(&r).contains(says), "{body}: {}", message(&r));
    }
    assert_eq!(
        sim.admin_get("tenants").await["tenants"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

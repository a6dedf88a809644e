//! The operator's three credentials end to end (issue 6): a client secret, a certificate
//! (PS256 and RS256 client assertions) and Kubernetes workload identity (a federated token file
//! that is rotated mid-run). Each runs the real operator binary against the real kube-apiserver
//! and an `mde-sim` whose token endpoint verifies the credential for real: the assertion's
//! signature against the registered certificate, the federated token's against the cluster's
//! service-account issuer keys (`/openid/v1/jwks`). Ground truth is the simulator's call log,
//! which records the credential each token request presented.
//!
//! RSA test certificates are made with the `openssl` command.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::cluster::cluster;
use common::operator::{
    Operator, OperatorConfig, apply, condition, device_isolation, machine_id, wait_ready,
    wait_stalled,
};
use common::sim::Sim;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, ObjectMeta, PostParams};
use mde_isolation_operator::crd::DeviceIsolation;
use serde_json::Value;

const SCALE: &str = "60";
const CLIENT_ID: &str = "6f1c2a3b-0000-4000-8000-00000000a001";
const EXCHANGE_AUDIENCE: &str = "api://AzureADTokenExchange";

/// A self-signed RSA-2048 certificate and key (`name.crt`, `name.key`) in `dir`, the key in
/// PKCS#1 form when `pkcs1`, else PKCS#8.
fn rsa_pair(dir: &Path, name: &str, pkcs1: bool) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("the openssl command is needed to make RSA test certificates");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let (c, k) = (cert.to_str().unwrap(), key.to_str().unwrap());
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=mde-op",
        "-keyout",
        k,
        "-out",
        c,
    ]);
    if pkcs1 {
        run(&["rsa", "-in", k, "-traditional", "-out", k]);
    }
    (cert, key)
}

/// `x5t#S256` of a PEM certificate file.
fn thumbprint(cert: &Path) -> String {
    let pem = std::fs::read(cert).unwrap();
    let der = rustls_pemfile::certs(&mut &pem[..])
        .next()
        .unwrap()
        .unwrap();
    URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, der.as_ref()))
}

/// A seed file with one isolated online machine per id and the app, whose credential lines
/// (`clientSecret: ...`, `certificates: [...]`, `federated: [...]`) are `credential`.
fn seed(dir: &Path, machines: &[&str], credential: &str) -> PathBuf {
    let mut yaml = String::from("machines:\n");
    for (i, m) in machines.iter().enumerate() {
        yaml.push_str(&format!(
            "- id: {m}\n  computerDnsName: host-{i}.contoso.local\n  behaviour: online\n  isolated: true\n"
        ));
    }
    yaml.push_str(&format!(
        "apps:\n- clientId: {CLIENT_ID}\n  displayName: MDE Isolation Operator\n  roles: [Machine.Isolate, Machine.Read.All]\n"
    ));
    for line in credential.lines() {
        yaml.push_str(&format!("  {line}\n"));
    }
    let path = dir.join("seed.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

fn start_sim(seed: &Path, extra: &[&str]) -> Sim {
    let mut args = vec!["--seed", seed.to_str().unwrap(), "--time-scale", SCALE];
    args.extend_from_slice(extra);
    Sim::start(&args)
}

fn config<'a>(kubeconfig: &'a Path, ns: &str, extra: &[&str]) -> OperatorConfig<'a> {
    let mut cfg = OperatorConfig::new(kubeconfig, ns);
    cfg.client_id = CLIENT_ID.into();
    cfg.extra = extra.iter().map(|s| s.to_string()).collect();
    cfg
}

/// The token requests the simulator received.
async fn token_calls(sim: &Sim) -> Vec<Value> {
    sim.admin_calls()
        .await
        .into_iter()
        .filter(|c| c["api"] == "token")
        .collect()
}

/// Releases `machine` through a DeviceIsolation named `name` and checks the result: Ready,
/// released in ground truth, by exactly one Unisolate action requested by the app.
async fn release(
    sim: &Sim,
    op: &Operator,
    client: &kube::Client,
    ns: &str,
    machine: &str,
    name: &str,
) {
    let di = device_isolation(
        name,
        machine,
        false,
        Some("Released after re-image (INC-6)"),
    );
    apply(client, ns, &di).await;
    let ready = wait_ready(client, ns, name, op).await;
    assert_eq!(condition(&ready, "Ready").unwrap().1, "Released");
    let truth = sim.ground_truth(machine).await;
    assert_eq!(truth["isolated"], false, "{truth}");
    let actions = truth["actions"].as_array().unwrap();
    assert_eq!(actions.len(), 1, "exactly one action: {truth}");
    assert_eq!(actions[0]["type"], "Unisolate");
    assert_eq!(actions[0]["requestor"], "MDE Isolation Operator");
}

/// Every token request succeeded and presented `credential`.
fn all_with(calls: &[Value], credential: &str) {
    assert!(!calls.is_empty());
    for c in calls {
        assert_eq!(
            (
                c["status"].as_u64(),
                c["credential"].as_str(),
                c["app"].as_str()
            ),
            (Some(200), Some(credential), Some(CLIENT_ID)),
            "{calls:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_secret_file() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("auth-secret").await;
    let client = c.client().await;
    let dir = tempfile::tempdir().unwrap();
    let m = machine_id(0x6001);
    let sim = start_sim(&seed(dir.path(), &[&m], "clientSecret: s3cr=t"), &[]);
    let secret = dir.path().join("client-secret");
    std::fs::write(&secret, "s3cr=t\n").unwrap();
    let op = Operator::start_with_credential(
        &sim,
        config(&c.kubeconfig, &ns, &[]),
        &[("MDE_CLIENT_SECRET_FILE", secret.to_str().unwrap())],
    );
    release(&sim, &op, &client, &ns, &m, "by-secret").await;
    all_with(&token_calls(&sim).await, "secret");
    assert!(!op.output().contains("s3cr=t"), "the secret was logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_ps256_with_a_pkcs8_key() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("auth-ps256").await;
    let client = c.client().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = rsa_pair(dir.path(), "operator", false);
    let m = machine_id(0x6002);
    // Registered by path, relative to the seed file.
    let sim = start_sim(
        &seed(dir.path(), &[&m], "certificates: [operator.crt]"),
        &[],
    );
    // PS256 is the default algorithm.
    let op = Operator::start_with_credential(
        &sim,
        config(&c.kubeconfig, &ns, &[]),
        &[
            ("MDE_CLIENT_CERTIFICATE_FILE", cert.to_str().unwrap()),
            ("MDE_CLIENT_KEY_FILE", key.to_str().unwrap()),
        ],
    );
    release(&sim, &op, &client, &ns, &m, "by-cert").await;
    all_with(
        &token_calls(&sim).await,
        &format!("certificate:{}", thumbprint(&cert)),
    );
    let log = op.output();
    assert!(
        log.contains("authenticating with a client certificate"),
        "{log}"
    );
    assert!(
        !log.contains("PRIVATE KEY") && !log.contains("eyJ"),
        "key or assertion logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rs256_with_a_pkcs1_key_in_the_certificate_file() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("auth-rs256").await;
    let client = c.client().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = rsa_pair(dir.path(), "operator", true);
    let both = dir.path().join("operator.pem");
    let mut pem = std::fs::read(&cert).unwrap();
    pem.extend(std::fs::read(&key).unwrap());
    std::fs::write(&both, pem).unwrap();
    let m = machine_id(0x6003);
    // Registered inline, as PEM text.
    let inline = std::fs::read_to_string(&cert).unwrap();
    let credential = format!(
        "certificates:\n- |\n{}",
        inline
            .lines()
            .map(|l| format!("  {l}\n"))
            .collect::<String>()
    );
    let sim = start_sim(&seed(dir.path(), &[&m], &credential), &[]);
    let op = Operator::start_with_credential(
        &sim,
        config(
            &c.kubeconfig,
            &ns,
            &[
                "--client-certificate-file",
                both.to_str().unwrap(),
                "--assertion-algorithm",
                "RS256",
            ],
        ),
        &[],
    );
    release(&sim, &op, &client, &ns, &m, "by-cert").await;
    all_with(
        &token_calls(&sim).await,
        &format!("certificate:{}", thumbprint(&cert)),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unregistered_certificate_is_refused_without_hammering_the_token_endpoint() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("auth-wrong-cert").await;
    let client = c.client().await;
    let dir = tempfile::tempdir().unwrap();
    rsa_pair(dir.path(), "registered", false);
    let (cert, key) = rsa_pair(dir.path(), "other", false);
    let m = machine_id(0x6004);
    let sim = start_sim(
        &seed(dir.path(), &[&m], "certificates: [registered.crt]"),
        &[],
    );
    let op = Operator::start_with_credential(
        &sim,
        config(&c.kubeconfig, &ns, &[]),
        &[
            ("MDE_CLIENT_CERTIFICATE_FILE", cert.to_str().unwrap()),
            ("MDE_CLIENT_KEY_FILE", key.to_str().unwrap()),
        ],
    );
    apply(
        &client,
        &ns,
        &device_isolation("wrong", &m, false, Some("INC-6")),
    )
    .await;
    let refused = sim
        .wait_until(60, "a refused token request", || async {
            let calls = token_calls(&sim).await;
            (!calls.is_empty()).then_some(calls)
        })
        .await;
    assert_eq!(
        (
            refused[0]["status"].as_u64(),
            refused[0]["credential"].as_str()
        ),
        (
            Some(401),
            Some(format!("certificate:{}", thumbprint(&cert)).as_str())
        )
    );

    // Six seconds are six simulated minutes, when the batch poller retries every ten
    // simulated seconds: the refused credential is sent again after one simulated minute, then
    // two, then four, not on every retry.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let calls = token_calls(&sim).await;
    assert!(calls.iter().all(|c| c["status"] == 401), "{calls:#?}");
    assert!(calls.len() <= 4, "{} token requests in 6 s", calls.len());
    let truth = sim.ground_truth(&m).await;
    assert_eq!(truth["actions"].as_array().unwrap().len(), 0, "{truth}");
    assert_eq!(truth["isolated"], true);

    // The resource is not Ready; if it stalls, it says why.
    let api: Api<DeviceIsolation> = Api::namespaced(client.clone(), &ns);
    let di = api.get("wrong").await.unwrap();
    assert_ne!(condition(&di, "Ready").map(|c| c.0), Some("True".into()));
    if let Some((status, reason, message)) = condition(&di, "Stalled") {
        assert!(
            status != "True" || reason == "AuthenticationFailed",
            "{reason}: {message}"
        );
    }
    let log = op.output();
    assert!(
        log.contains("invalid_client") && log.contains("AADSTS700027"),
        "the refusal is logged with Entra's reason:\n{}",
        op.tail()
    );
}

/// A token for ServiceAccount `ns/name` from the cluster's TokenRequest API, for the token
/// exchange audience: what the kubelet projects into a pod with Azure workload identity.
async fn service_account_token(client: &kube::Client, ns: &str, name: &str) -> String {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        ..ServiceAccount::default()
    };
    if let Err(e) = api.create(&PostParams::default(), &sa).await {
        assert!(matches!(&e, kube::Error::Api(s) if s.code == 409), "{e}");
    }
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![EXCHANGE_AUDIENCE.into()],
            expiration_seconds: Some(3600),
            bound_object_ref: None,
        },
        ..TokenRequest::default()
    };
    api.create_token_request(name, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("TokenRequest for {ns}/{name}: {e}"))
        .status
        .expect("status")
        .token
}

async fn get_json(client: &kube::Client, path: &str) -> Value {
    let req = axum::http::Request::get(path).body(Vec::new()).unwrap();
    let text = client
        .request_text(req)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

/// Replaces `path` atomically, as the kubelet does when it rotates a projected token.
fn write_atomically(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_identity_rereads_the_rotated_token_file() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("auth-wi").await;
    let client = c.client().await;
    let dir = tempfile::tempdir().unwrap();

    // The cluster is the token issuer: its discovery document and signing keys.
    let issuer = get_json(&client, "/.well-known/openid-configuration").await["issuer"]
        .as_str()
        .expect("issuer")
        .to_string();
    let jwks = get_json(&client, "/openid/v1/jwks").await;
    std::fs::write(dir.path().join("jwks.json"), jwks.to_string()).unwrap();
    let subject = |sa: &str| format!("system:serviceaccount:{ns}:{sa}");
    // Two federated credentials, one per ServiceAccount, so the log tells the tokens apart.
    let federated = format!(
        "federated:\n- issuer: {issuer}\n  subject: {}\n  jwks: jwks.json\n- issuer: {issuer}\n  subject: {}\n  audience: {EXCHANGE_AUDIENCE}\n  jwks: jwks.json\n",
        subject("wi-a"),
        subject("wi-b")
    );
    let (m1, m2, m3) = (machine_id(0x6005), machine_id(0x6006), machine_id(0x6007));
    // Access tokens live 120 simulated seconds (2 s real): the operator asks often.
    let sim = start_sim(
        &seed(dir.path(), &[&m1, &m2, &m3], &federated),
        &["--token-lifetime", "120"],
    );

    let token_file = dir.path().join("azure-identity-token");
    write_atomically(
        &token_file,
        &service_account_token(&client, &ns, "wi-a").await,
    );
    let authority = format!("{}/", sim.base_url);
    // What the workload identity webhook injects; no --client-id, --tenant-id or --authority.
    let op = Operator::start_with_credential(
        &sim,
        config(&c.kubeconfig, &ns, &[]),
        &[
            ("AZURE_FEDERATED_TOKEN_FILE", token_file.to_str().unwrap()),
            ("AZURE_CLIENT_ID", CLIENT_ID),
            ("AZURE_TENANT_ID", "72f988bf-86f1-41af-91ab-2d7cd011db47"),
            ("AZURE_AUTHORITY_HOST", &authority),
        ],
    );
    release(&sim, &op, &client, &ns, &m1, "first").await;
    let first = token_calls(&sim).await;
    all_with(&first, &format!("federated:{}", subject("wi-a")));
    assert!(
        first[0]["path"]
            .as_str()
            .unwrap()
            .starts_with("/72f988bf-86f1-41af-91ab-2d7cd011db47/"),
        "AZURE_TENANT_ID names the tenant: {first:#?}"
    );

    // The kubelet rotates the token; the next token request must send the new one.
    write_atomically(
        &token_file,
        &service_account_token(&client, &ns, "wi-b").await,
    );
    release(&sim, &op, &client, &ns, &m2, "second").await;
    let calls = token_calls(&sim).await;
    let rotated = calls
        .iter()
        .position(|c| c["credential"] == format!("federated:{}", subject("wi-b")))
        .unwrap_or_else(|| panic!("the rotated token was never sent: {calls:#?}"));
    all_with(&calls[..rotated], &format!("federated:{}", subject("wi-a")));
    all_with(&calls[rotated..], &format!("federated:{}", subject("wi-b")));

    // A token of a ServiceAccount the app does not trust: refused, and the resource stalls.
    write_atomically(
        &token_file,
        &service_account_token(&client, &ns, "wi-c").await,
    );
    tokio::time::sleep(Duration::from_secs(3)).await; // the cached access token expires
    apply(
        &client,
        &ns,
        &device_isolation("third", &m3, false, Some("INC-6")),
    )
    .await;
    let (reason, message) = wait_stalled(&client, &ns, "third", &op).await;
    assert_eq!(reason, "AuthenticationFailed", "{message}");
    assert!(message.contains("AADSTS700213"), "{message}");
    let log = op.output();
    assert!(!log.contains("eyJ"), "a token was logged");
}

#[test]
fn exactly_one_credential_or_the_operator_exits() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s").unwrap();
    let (cert, key) = rsa_pair(dir.path(), "op", false);
    let (other_cert, _) = rsa_pair(dir.path(), "other", false);
    let run = |args: &[&str], envs: &[(&str, &str)]| {
        let out = Command::new(env!("CARGO_BIN_EXE_mde-isolation-operator"))
            .args([
                "run",
                "--all-namespaces",
                "--tenant-id",
                "t",
                "--client-id",
                "c",
            ])
            .args(args)
            .env_clear()
            .envs(envs.iter().copied())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} {envs:?} started");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let none = run(&[], &[]);
    for option in [
        "--client-secret-file",
        "MDE_CLIENT_SECRET",
        "--client-certificate-file",
        "--federated-token-file",
        "AZURE_FEDERATED_TOKEN_FILE",
    ] {
        assert!(none.contains(option), "{none}");
    }
    let two = run(
        &["--client-certificate-file", cert.to_str().unwrap()],
        &[
            ("MDE_CLIENT_SECRET", "hunter2"),
            ("MDE_CLIENT_KEY_FILE", key.to_str().unwrap()),
        ],
    );
    assert!(
        two.contains("more than one credential")
            && two.contains("MDE_CLIENT_SECRET, --client-certificate-file")
            && !two.contains("hunter2"),
        "{two}"
    );
    let three = run(
        &["--client-secret-file", secret.to_str().unwrap()],
        &[("AZURE_FEDERATED_TOKEN_FILE", secret.to_str().unwrap())],
    );
    assert!(three.contains("more than one credential"), "{three}");
    let mismatch = run(
        &[
            "--client-certificate-file",
            other_cert.to_str().unwrap(),
            "--client-key-file",
            key.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        mismatch.contains("does not belong to the certificate"),
        "{mismatch}"
    );
    assert!(!mismatch.contains("PRIVATE"), "{mismatch}");
    let missing = run(&["--federated-token-file", "/nonexistent/token"], &[]);
    assert!(missing.contains("/nonexistent/token"), "{missing}");
    let no_tenant = Command::new(env!("CARGO_BIN_EXE_mde-isolation-operator"))
        .args(["run", "--all-namespaces", "--client-id", "c"])
        .env_clear()
        .output()
        .unwrap();
    assert!(!no_tenant.status.success());
    assert!(String::from_utf8_lossy(&no_tenant.stderr).contains("--tenant-id"));
}

/// Runs `helm template` on the chart with `values` (besides the tenant and client ids).
fn helm_template(values: &[&str]) -> std::process::Output {
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/mde-isolation-operator");
    let mut cmd = cluster().helm();
    cmd.args(["template", "x", chart, "-n", "secops"]).args([
        "--set",
        "mde.tenantId=t",
        "--set",
        "mde.clientId=c",
    ]);
    for v in values {
        cmd.args(["--set", v]);
    }
    cmd.output().expect("helm")
}

/// The rendered object of `kind`.
fn rendered(out: &std::process::Output, kind: &str) -> serde_yaml::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| <serde_yaml::Value as serde::Deserialize>::deserialize(d).unwrap())
        .find(|v| v["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in:\n{text}"))
}

/// The container's environment as (name, value) pairs.
fn env_of(deployment: &serde_yaml::Value) -> Vec<(String, String)> {
    deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e["value"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_renders_each_credential_and_the_server_accepts_it() {
    let c = cluster();
    let file_env = |env: &[(String, String)]| -> Vec<String> {
        env.iter()
            .map(|(k, _)| k.clone())
            .filter(|k| {
                k.starts_with("MDE_CLIENT_S")
                    || k.starts_with("MDE_CLIENT_C")
                    || k.starts_with("MDE_CLIENT_K")
                    || k.starts_with("AZURE_")
            })
            .collect()
    };

    // Client secret: the Secret mounted, its file passed.
    let out = helm_template(&["mde.existingSecret=mde-client"]);
    let d = rendered(&out, "Deployment");
    assert_eq!(file_env(&env_of(&d)), ["MDE_CLIENT_SECRET_FILE"]);
    let volumes = &d["spec"]["template"]["spec"]["volumes"];
    assert_eq!(volumes[0]["secret"]["secretName"], "mde-client");

    // Certificate: the tls Secret mounted read-only, both files and the algorithm passed.
    let out = helm_template(&[
        "mde.certificate.existingSecret=mde-client-cert",
        "mde.certificate.algorithm=RS256",
    ]);
    let d = rendered(&out, "Deployment");
    let env = env_of(&d);
    assert_eq!(
        file_env(&env),
        ["MDE_CLIENT_CERTIFICATE_FILE", "MDE_CLIENT_KEY_FILE"]
    );
    assert!(env.contains(&("MDE_ASSERTION_ALGORITHM".into(), "RS256".into())));
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(pod["volumes"][0]["secret"]["secretName"], "mde-client-cert");
    let items: Vec<&str> = pod["volumes"][0]["secret"]["items"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|i| i["path"].as_str().unwrap())
        .collect();
    assert_eq!(items, ["tls.crt", "tls.key"]);
    assert_eq!(pod["containers"][0]["volumeMounts"][0]["readOnly"], true);

    // Workload identity: no Secret, the annotations and the label the webhook looks for.
    let out = helm_template(&["workloadIdentity.enabled=true"]);
    let d = rendered(&out, "Deployment");
    assert!(file_env(&env_of(&d)).is_empty());
    assert!(d["spec"]["template"]["spec"]["volumes"].is_null());
    assert_eq!(
        d["spec"]["template"]["metadata"]["labels"]["azure.workload.identity/use"],
        "true"
    );
    let sa = rendered(&out, "ServiceAccount");
    assert_eq!(
        sa["metadata"]["annotations"]["azure.workload.identity/client-id"],
        "c"
    );
    assert_eq!(
        sa["metadata"]["annotations"]["azure.workload.identity/tenant-id"],
        "t"
    );

    // Exactly one.
    for (values, message) in [
        (
            &[][..],
            "no credential: set exactly one of mde.existingSecret",
        ),
        (
            &["mde.existingSecret=s", "workloadIdentity.enabled=true"][..],
            "more than one credential (mde.existingSecret, workloadIdentity.enabled)",
        ),
        (
            &["mde.existingSecret=s", "mde.certificate.existingSecret=t"][..],
            "more than one credential",
        ),
        (
            &[
                "mde.certificate.existingSecret=t",
                "mde.certificate.algorithm=ES256",
            ][..],
            "mde.certificate.algorithm must be PS256 or RS256",
        ),
    ] {
        let out = helm_template(values);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(message),
            "{values:?}: {stderr}"
        );
    }

    // What the certificate and workload identity variants render, the API server accepts.
    for values in [
        &["mde.certificate.existingSecret=mde-client-cert"][..],
        &["workloadIdentity.enabled=true"][..],
    ] {
        let ns = c.namespace("auth-chart").await;
        let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/mde-isolation-operator");
        let mut cmd = c.helm();
        cmd.args(["template", "x", chart, "-n", &ns]).args([
            "--set",
            "mde.tenantId=t",
            "--set",
            "mde.clientId=c",
        ]);
        for v in values {
            cmd.args(["--set", v]);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success());
        let mut apply = c
            .kubectl()
            .args(["apply", "--dry-run=server", "-n", &ns, "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        apply.stdin.take().unwrap().write_all(&out.stdout).unwrap();
        let res = apply.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&res.stdout);
        assert!(
            res.status.success()
                && stdout
                    .contains("deployment.apps/x-mde-isolation-operator created (server dry run)")
                && stdout
                    .contains("serviceaccount/x-mde-isolation-operator created (server dry run)"),
            "{values:?}: {stdout}\n{}",
            String::from_utf8_lossy(&res.stderr)
        );
    }
}

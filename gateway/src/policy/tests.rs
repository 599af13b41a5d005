use super::*;
use proptest::prelude::*;

fn id(s: &str) -> Identity {
    Identity::parse(s).unwrap()
}

fn policies(yaml: &str) -> Policies {
    let raw: RawAuthorization = serde_yaml_ng::from_str(yaml).unwrap();
    let mut e = Errors::default();
    let p = validate(&raw, &mut e);
    e.into_result().unwrap();
    p
}

#[test]
fn deny_wins_allow_narrows_and_the_default_decides_the_rest() {
    let p = policies(
        r#"
default_deny: false
policies:
  - name: readers
    service: reviews.shop
    action: allow
    rules:
      - from: { identities: ["spiffe://td/ns/shop/sa/frontend"] }
        to: { methods: [GET], paths: ["/public/*"] }
  - name: no-admin
    service: reviews.shop
    action: deny
    rules:
      - to: { paths: ["/admin*"] }
  - name: watch
    action: audit
    rules: [{ from: { namespaces: [shop] } }]
"#,
    );
    let (svc, other) = (ServiceName::new("reviews.shop").unwrap(), ServiceName::new("orders.shop").unwrap());
    let fe = id("spiffe://td/ns/shop/sa/frontend");
    let h = http::HeaderMap::new();
    let ask = |s: &ServiceName, who: &Identity, method: &'static str, path: &'static str| {
        p.decide(&Subject {
            service: Some(s),
            identity: Some(who),
            http: Some(HttpSubject { method, path, headers: &h }),
            ..Default::default()
        })
    };
    let d = ask(&svc, &fe, "GET", "/public/a");
    assert_eq!((d.allowed, d.policy.as_str(), d.reason), (true, "readers", "allow_rule"));
    assert_eq!(d.audited, vec!["watch"]);
    let d = ask(&svc, &fe, "POST", "/public/a");
    assert_eq!((d.allowed, d.reason), (false, "no_allow_rule"));
    let d = ask(&svc, &fe, "GET", "/admin/x");
    assert_eq!((d.allowed, d.policy.as_str(), d.reason), (false, "no-admin", "deny_rule"));
    // Another service has no allow policy: the default (allow) decides.
    let d = ask(&other, &id("spiffe://td/ns/x/sa/y"), "POST", "/anything");
    assert_eq!((d.allowed, d.reason), (true, "default_allow"));
    // A TCP flow: the allow rule's HTTP conditions never match it; the deny rule's always do.
    let d = p.decide(&Subject { service: Some(&svc), identity: Some(&fe), ..Default::default() });
    assert_eq!((d.allowed, d.policy.as_str()), (false, "no-admin"));
}

#[test]
fn globs_and_namespaces() {
    assert!(glob("/api/*", "/api/v1/x"));
    assert!(glob("*.json", "/a/b.json"));
    assert!(glob("/a*b*c", "/a-b-b-c"));
    assert!(!glob("/api/*", "/apx/v1"));
    assert!(!glob("/exact", "/exact/more"));
    assert_eq!(namespace(&id("spiffe://td/ns/shop/sa/frontend")), Some("shop"));
    assert_eq!(namespace(&id("spiffe://td/zone/a/gateway/gw-1")), None);
}

#[test]
fn bad_policies_name_their_paths() {
    let raw: RawAuthorization = serde_yaml_ng::from_str(
            r#"
policies:
  - { name: a, action: permit, rules: [{}] }
  - { name: a, action: allow, rules: [{ from: { identities: ["nope"], cidrs: ["10.0.0.0/99"] }, to: { paths: ["x"], ports: [0] } }] }
"#,
        )
        .unwrap();
    let mut e = Errors::default();
    let _ = validate(&raw, &mut e);
    let paths: Vec<String> = e.into_result().unwrap_err().into_iter().map(|x| x.path).collect();
    assert_eq!(
        paths,
        vec![
            "authorization.policies[0].action",
            "authorization.policies[1].name",
            "authorization.policies[1].rules[0].from.identities[0]",
            "authorization.policies[1].rules[0].from.cidrs[0]",
            "authorization.policies[1].rules[0].to.ports",
            "authorization.policies[1].rules[0].to.paths[0]",
        ]
    );
}

/// The plain reference: the README's four steps read literally, over the whole policy list.
fn reference(p: &Policies, s: &Subject<'_>) -> bool {
    let applicable: Vec<&Policy> =
        p.policies.iter().filter(|x| x.service.is_none() || x.service.as_ref() == s.service).collect();
    let holds = |r: &PolicyRule, deny: bool| -> bool {
        let mut ok = true;
        if !r.identities.is_empty() {
            ok &= s.identity.is_some_and(|i| {
                r.identities.iter().any(|m| match m {
                    IdMatch::Exact(x) => i.as_str() == x,
                    IdMatch::Prefix(x) => i.as_str().starts_with(x.as_str()),
                })
            });
        }
        if !r.zones.is_empty() {
            ok &= s.zone.is_some_and(|z| r.zones.iter().any(|x| x == z));
        }
        if !r.cidrs.is_empty() {
            ok &= s.addr.is_some_and(|a| r.cidrs.iter().any(|n| n.contains(&a)));
        }
        if !r.ports.is_empty() {
            ok &= s.port.is_some_and(|x| r.ports.contains(&x));
        }
        match &s.http {
            Some(h) => {
                if !r.methods.is_empty() {
                    ok &= r.methods.iter().any(|m| m == h.method);
                }
                if !r.paths.is_empty() {
                    ok &= r.paths.iter().any(|x| glob(x, h.path));
                }
            }
            None => {
                if !r.methods.is_empty() || !r.paths.is_empty() || !r.headers.is_empty() {
                    ok &= deny;
                }
            }
        }
        ok
    };
    if applicable.iter().any(|x| x.action == Action::Deny && x.rules.iter().any(|r| holds(r, true))) {
        return false;
    }
    let allows: Vec<&&Policy> = applicable.iter().filter(|x| x.action == Action::Allow).collect();
    if !allows.is_empty() {
        return allows.iter().any(|x| x.rules.iter().any(|r| holds(r, false)));
    }
    !p.default_deny
}

fn arb_rule() -> impl Strategy<Value = PolicyRule> {
    let ids = prop::collection::vec(
        prop_oneof![
            Just(IdMatch::Exact("spiffe://td/ns/a/sa/x".into())),
            Just(IdMatch::Exact("spiffe://td/ns/b/sa/y".into())),
            Just(IdMatch::Prefix("spiffe://td/ns/a/".into())),
        ],
        0..2,
    );
    let zones = prop::collection::vec(prop_oneof![Just("east".to_string()), Just("west".to_string())], 0..2);
    let cidrs = prop::collection::vec(
        prop_oneof![
            Just("10.0.0.0/8".parse::<ipnet::IpNet>().unwrap()),
            Just("10.1.0.0/16".parse::<ipnet::IpNet>().unwrap())
        ],
        0..2,
    );
    let ports = prop::collection::vec(prop_oneof![Just(80u16), Just(443)], 0..2);
    let methods = prop::collection::vec(prop_oneof![Just("GET".to_string()), Just("POST".to_string())], 0..2);
    let paths = prop::collection::vec(prop_oneof![Just("/a/*".to_string()), Just("/b".to_string())], 0..2);
    (ids, zones, cidrs, ports, methods, paths).prop_map(|(identities, zones, cidrs, ports, methods, paths)| {
        PolicyRule { identities, zones, cidrs, ports, methods, paths, ..Default::default() }
    })
}

fn arb_policies() -> impl Strategy<Value = Policies> {
    let policy = (
        prop_oneof![Just(Action::Allow), Just(Action::Deny), Just(Action::Audit)],
        prop_oneof![Just(None), Just(Some("s.one")), Just(Some("s.two"))],
        prop::collection::vec(arb_rule(), 1..3),
    );
    (any::<bool>(), prop::collection::vec(policy, 0..5)).prop_map(|(default_deny, ps)| Policies {
        audit_mode: false,
        default_deny,
        policies: ps
            .into_iter()
            .enumerate()
            .map(|(i, (action, svc, rules))| Policy {
                name: format!("p{i}"),
                service: svc.map(|s| ServiceName::new(s).unwrap()),
                action,
                rules,
            })
            .collect(),
    })
}

proptest! {
    #[test]
    fn the_evaluator_agrees_with_the_reference(
        p in arb_policies(),
        svc in prop_oneof![Just("s.one"), Just("s.two")],
        who in prop_oneof![Just("spiffe://td/ns/a/sa/x"), Just("spiffe://td/ns/b/sa/y"), Just("spiffe://td/ns/c/sa/z")],
        zone in prop_oneof![Just("east"), Just("west"), Just("north")],
        addr in prop_oneof![Just("10.1.2.3"), Just("10.2.0.1"), Just("192.168.0.1")],
        port in prop_oneof![Just(80u16), Just(443), Just(8080)],
        req in prop_oneof![Just(None), Just(Some(("GET", "/a/x"))), Just(Some(("POST", "/b"))), Just(Some(("GET", "/c")))],
    ) {
        let svc = ServiceName::new(svc).unwrap();
        let who = id(who);
        let h = http::HeaderMap::new();
        let s = Subject {
            service: Some(&svc),
            identity: Some(&who),
            zone: Some(zone),
            addr: Some(addr.parse().unwrap()),
            port: Some(port),
            http: req.map(|(method, path)| HttpSubject { method, path, headers: &h }),
        };
        prop_assert_eq!(p.decide(&s).allowed, reference(&p, &s));
    }
}

use super::*;

const SERVER: &str = "sha256:abcd";

fn proof(url: &str, signed: &str) -> AwsStsProof {
    // The Host header carries the port when the URL names one, as a signing client sends it.
    let host = Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(|h| u.port().map_or_else(|| h.to_owned(), |p| format!("{h}:{p}"))))
        .unwrap_or_default();
    let mut headers = BTreeMap::new();
    headers.insert(
        "Authorization".to_owned(),
        format!(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261202/us-east-1/sts/aws4_request, SignedHeaders={signed}, Signature={}",
            "a".repeat(64)
        ),
    );
    headers.insert("host".to_owned(), host);
    headers.insert("x-amz-date".to_owned(), "20261202T180000Z".to_owned());
    headers.insert(CHALLENGE_HEADER.to_owned(), "nonce".to_owned());
    headers.insert(SERVER_ID_HEADER.to_owned(), SERVER.to_owned());
    AwsStsProof { method: "POST".into(), url: url.into(), headers, body: GET_CALLER_IDENTITY_BODY.into() }
}

const SIGNED: &str = "host;x-airlock-join-challenge;x-airlock-server-id;x-amz-date";

#[test]
fn only_public_sts_endpoints_are_allowed_by_default() {
    let allow = StsAllowList::default();
    for ok in [
        "https://sts.amazonaws.com/",
        "https://sts.eu-west-1.amazonaws.com/",
        "https://sts.ap-southeast-2.amazonaws.com/",
        "https://sts.us-gov-west-1.amazonaws.com/",
    ] {
        let checked = check_proof(&proof(ok, SIGNED), &allow, SERVER).unwrap();
        assert_eq!(checked.challenge, "nonce");
        assert!(checked.headers.iter().all(|(n, _)| n != "host"));
    }
    for bad in [
        "http://sts.amazonaws.com/",
        "https://sts.amazonaws.com:8443/",
        "https://sts.amazonaws.com.evil.example/",
        "https://evil.example/",
        "https://sts..amazonaws.com/",
        "https://iam.amazonaws.com/",
        "https://169.254.169.254/",
        // S3 hosts of a bucket named `sts`: one label under amazonaws.com, but no region's.
        "https://sts.s3.amazonaws.com/",
        "https://sts.s3-accelerate.amazonaws.com/",
        "https://sts.s3-external-1.amazonaws.com/",
        "https://sts.us.amazonaws.com/",
        "https://sts.us-east.amazonaws.com/",
        "https://sts.us-east-123.amazonaws.com/",
    ] {
        let err = check_proof(&proof(bad, SIGNED), &allow, SERVER).unwrap_err();
        assert!(matches!(err, AwsRefusal::EndpointNotAllowed(_)), "{bad}: {err:?}");
    }
}

#[test]
fn a_configured_endpoint_replaces_the_defaults() {
    let allow = StsAllowList::new(&["http://127.0.0.1:5000".to_owned()]).unwrap();
    assert!(check_proof(&proof("http://127.0.0.1:5000/", SIGNED), &allow, SERVER).is_ok());
    let err = check_proof(&proof("https://sts.amazonaws.com/", SIGNED), &allow, SERVER).unwrap_err();
    assert!(matches!(err, AwsRefusal::EndpointNotAllowed(_)));
    assert!(check_proof(&proof("http://127.0.0.1:5001/", SIGNED), &allow, SERVER).is_err());
    for bad in ["127.0.0.1:5000", "http://u:p@h/", "http://h/sts", "file:///x"] {
        assert!(StsAllowList::new(&[bad.to_owned()]).is_err(), "{bad}");
    }
}

#[test]
fn the_challenge_server_id_and_host_must_be_signed_and_match() {
    let allow = StsAllowList::default();
    let url = "https://sts.amazonaws.com/";
    for (signed, missing) in [
        ("host;x-airlock-server-id;x-amz-date", CHALLENGE_HEADER),
        ("host;x-airlock-join-challenge;x-amz-date", SERVER_ID_HEADER),
        ("x-airlock-join-challenge;x-airlock-server-id;x-amz-date", "host"),
    ] {
        assert_eq!(check_proof(&proof(url, signed), &allow, SERVER).unwrap_err(), AwsRefusal::UnsignedHeader(missing));
    }
    assert_eq!(check_proof(&proof(url, SIGNED), &allow, "sha256:other").unwrap_err(), AwsRefusal::OtherServer);
    let mut p = proof(url, SIGNED);
    p.headers.insert("host".into(), "sts.eu-west-1.amazonaws.com".into());
    assert!(matches!(check_proof(&p, &allow, SERVER), Err(AwsRefusal::Malformed(_))));
}

#[test]
fn anything_but_get_caller_identity_is_refused_before_it_is_sent() {
    let allow = StsAllowList::default();
    let url = "https://sts.amazonaws.com/";
    let mut p = proof(url, SIGNED);
    p.body = "Action=AssumeRole&Version=2011-06-15&RoleArn=x".into();
    assert!(matches!(check_proof(&p, &allow, SERVER), Err(AwsRefusal::Malformed(_))));
    let mut p = proof(url, SIGNED);
    p.method = "GET".into();
    assert!(matches!(check_proof(&p, &allow, SERVER), Err(AwsRefusal::Malformed(_))));
    assert!(matches!(
        check_proof(&proof("https://sts.amazonaws.com/?Action=GetCallerIdentity", SIGNED), &allow, SERVER),
        Err(AwsRefusal::Malformed(_))
    ));
    let mut p = proof(url, SIGNED);
    let auth = p.headers["Authorization"].replace("/sts/", "/iam/");
    p.headers.insert("Authorization".into(), auth);
    assert!(matches!(check_proof(&p, &allow, SERVER), Err(AwsRefusal::Malformed(_))));
    let mut p = proof(url, SIGNED);
    p.headers.insert("authorization".into(), "Bearer x".into());
    assert!(matches!(check_proof(&p, &allow, SERVER), Err(AwsRefusal::Malformed(_))), "given twice");
    let mut p = proof(url, SIGNED);
    p.headers.insert("x-evil".into(), "a\r\nb".into());
    assert!(matches!(check_proof(&p, &allow, SERVER), Err(AwsRefusal::Malformed(_))));
}

#[test]
fn a_proof_signing_headers_that_change_what_sts_reads_is_refused_and_others_are_not_forwarded() {
    let allow = StsAllowList::default();
    let url = "https://sts.amazonaws.com/";
    // Another protocol (x-amz-target), other framing (expect, transfer-encoding), anything else.
    for extra in ["x-amz-target", "expect", "transfer-encoding", "connection", "user-agent"] {
        let mut p = proof(url, &format!("{SIGNED};{extra}"));
        p.headers.insert(extra.into(), "x".into());
        let err = check_proof(&p, &allow, SERVER).unwrap_err();
        assert!(matches!(&err, AwsRefusal::Malformed(why) if why.contains(extra)), "{extra}: {err:?}");
    }
    let mut p = proof(url, &format!("{SIGNED};content-type"));
    p.headers.insert("content-type".into(), "application/x-amz-json-1.1".into());
    assert!(matches!(check_proof(&p, &allow, SERVER), Err(AwsRefusal::Malformed(_))), "a JSON request");
    // What a signing SDK sends passes; a header it did not sign is not sent on.
    let mut p = proof(
        url,
        &format!("{SIGNED};content-type;x-amz-security-token").replace("x-amz-date", "content-length;x-amz-date"),
    );
    p.headers.insert("content-type".into(), "application/x-www-form-urlencoded; charset=utf-8".into());
    p.headers.insert("x-amz-security-token".into(), "session".into());
    p.headers.insert("content-length".into(), GET_CALLER_IDENTITY_BODY.len().to_string());
    p.headers.insert("x-amz-target".into(), "unsigned".into());
    let checked = check_proof(&p, &allow, SERVER).unwrap();
    let sent: Vec<&str> = checked.headers.iter().map(|(n, _)| n.as_str()).collect();
    assert!(sent.contains(&"x-amz-security-token") && sent.contains(&"content-type"), "{sent:?}");
    assert!(!sent.contains(&"x-amz-target") && !sent.contains(&"content-length"), "{sent:?}");
}

#[test]
fn sts_answers_are_read_for_account_and_arn_only() {
    let ok = r#"<GetCallerIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <GetCallerIdentityResult>
    <Arn>arn:aws:sts::123456789012:assumed-role/airlock-prod/i-1</Arn>
    <UserId>AROAEXAMPLE:i-1</UserId>
    <Account>123456789012</Account>
  </GetCallerIdentityResult>
  <ResponseMetadata><RequestId>x</RequestId></ResponseMetadata>
</GetCallerIdentityResponse>"#;
    let id = read_caller_identity(ok).unwrap();
    assert_eq!(id.account, "123456789012");
    assert_eq!(id.arn, "arn:aws:iam::123456789012:role/airlock-prod");
    assert!(read_caller_identity("<html>hi</html>").is_none());
    assert!(read_caller_identity(&ok.replace("123456789012</Account>", "12</Account>")).is_none());
    let err = r#"<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type><Code>SignatureDoesNotMatch</Code><Message>m</Message></Error></ErrorResponse>"#;
    assert_eq!(error_code(err).as_deref(), Some("SignatureDoesNotMatch"));
}

#[test]
fn a_signed_environment_narrows_the_join_and_must_agree_with_the_one_it_names() {
    let allow = StsAllowList::default();
    let url = "https://sts.amazonaws.com/";
    let (a, b) = (EnvironmentId::from_random([1; 16]), EnvironmentId::from_random([2; 16]));
    let signed = format!("{SIGNED};{ENVIRONMENT_HEADER}");
    let mut p = proof(url, &signed);
    p.headers.insert(ENVIRONMENT_HEADER.into(), a.to_string());
    assert_eq!(check_proof(&p, &allow, SERVER).unwrap().environment, Some(a));
    // Sent but not signed: refused, not ignored.
    let mut unsigned = proof(url, SIGNED);
    unsigned.headers.insert(ENVIRONMENT_HEADER.into(), a.to_string());
    assert_eq!(check_proof(&unsigned, &allow, SERVER).unwrap_err(), AwsRefusal::UnsignedHeader(ENVIRONMENT_HEADER));
    p.headers.insert(ENVIRONMENT_HEADER.into(), "prod".into());
    assert!(matches!(check_proof(&p, &allow, SERVER), Err(AwsRefusal::Malformed(_))));
    assert_eq!(proof_without_environment(&allow), None);

    // The join's named environment against the signed one.
    assert_eq!(check_environment(Some(a), Some(a), true), Ok(Some(a)));
    assert_eq!(check_environment(Some(a), None, false), Ok(Some(a)), "a signed environment narrows as a named one");
    assert_eq!(check_environment(None, None, false), Ok(None));
    assert_eq!(check_environment(None, Some(b), true), Err(AwsRefusal::EnvironmentUnsigned(b)));
    assert_eq!(check_environment(None, Some(b), false), Ok(Some(b)), "a renewal need not sign its own");
    let err = check_environment(Some(a), Some(b), true).unwrap_err();
    assert_eq!(err, AwsRefusal::OtherEnvironment { signed: a, named: b });
    assert_eq!(err.code(), "environment_mismatch");
    assert!(err.reason().contains(&a.to_string()) && err.reason().contains(&b.to_string()), "{}", err.reason());
    assert_eq!(check_environment(Some(a), Some(b), false).unwrap_err().code(), "environment_mismatch");
}

fn proof_without_environment(allow: &StsAllowList) -> Option<EnvironmentId> {
    check_proof(&proof("https://sts.amazonaws.com/", SIGNED), allow, SERVER).unwrap().environment
}

#[test]
fn a_signed_tenant_pins_the_join_and_must_agree_with_the_one_it_names() {
    use airlock_core::TenantId;
    use airlock_proto::join::TENANT_HEADER;
    let allow = StsAllowList::default();
    let url = "https://sts.amazonaws.com/";
    let (alpha, beta) = (TenantId::from_random([1; 16]), TenantId::from_random([2; 16]));
    let mut p = proof(url, &format!("{SIGNED};{TENANT_HEADER}"));
    p.headers.insert(TENANT_HEADER.into(), alpha.to_string());
    assert_eq!(check_proof(&p, &allow, SERVER).unwrap().tenant, Some(alpha));
    // Sent but not signed: whoever relays it could change it, so it is refused, not ignored.
    let mut unsigned = proof(url, SIGNED);
    unsigned.headers.insert(TENANT_HEADER.into(), alpha.to_string());
    assert_eq!(check_proof(&unsigned, &allow, SERVER).unwrap_err(), AwsRefusal::UnsignedHeader(TENANT_HEADER));
    p.headers.insert(TENANT_HEADER.into(), "alpha".into());
    assert!(matches!(check_proof(&p, &allow, SERVER), Err(AwsRefusal::Malformed(_))));
    assert_eq!(check_proof(&proof(url, SIGNED), &allow, SERVER).unwrap().tenant, None);

    assert_eq!(check_tenant(Some(alpha), Some(alpha), true), Ok(Some(alpha)));
    let unsigned = check_tenant(None, Some(beta), true).unwrap_err();
    assert_eq!((unsigned.code(), unsigned.clone()), ("tenant_unsigned", AwsRefusal::TenantUnsigned(beta)));
    assert_eq!(check_tenant(None, Some(beta), false), Ok(Some(beta)), "a renewal need not sign its own");
    let err = check_tenant(Some(alpha), Some(beta), true).unwrap_err();
    assert_eq!(err, AwsRefusal::OtherTenant { signed: alpha, named: beta });
    assert_eq!(err.code(), "tenant_mismatch");
    assert!(err.reason().contains(&alpha.to_string()) && err.reason().contains(&beta.to_string()), "{}", err.reason());
}

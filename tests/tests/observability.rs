//! Issue 6: the lab gives each agent its own API socket and `--ip-masq`, `status` shows the
//! metrics URL and the socket, and an "outside" namespace shows masquerading.

use std::time::Duration;
use tweed_e2e::*;
use tweed_lab::LabSpec;

#[test]
fn status_shows_metrics_and_api_socket_and_both_answer() {
    let lab = up(LabSpec::new(lab_name("ob"), 2));
    let st = lab.status();
    let v: serde_json::Value = serde_json::from_str(&st.to_json()).unwrap();
    for (i, h) in lab.state().hosts.iter().enumerate() {
        let metrics = format!("http://{}:9867/metrics", h.public_ip);
        assert_eq!(v["hosts"][i]["metrics"], metrics);
        let sock = h.log.with_file_name("tweedd.sock");
        assert_eq!(v["hosts"][i]["api_socket"], sock.display().to_string());
        let argv = agent_cmdline(&lab, &h.name);
        assert_eq!(
            flag_value(&argv, "--api-socket"),
            Some(sock.to_str().unwrap())
        );
        assert!(argv.iter().any(|a| a == "--ip-masq"), "{argv:?}");

        // The metrics endpoint answers from another host, over the underlay.
        let other = if h.name == "h1" { "h2" } else { "h1" };
        let mut body = String::new();
        wait_for(Duration::from_secs(10), "metrics to answer", || {
            match lab.exec(other, &["curl", "-sf", "--max-time", "2", &metrics]) {
                Ok(b) => {
                    body = b;
                    true
                }
                Err(_) => false,
            }
        });
        assert!(body.contains("tweed"), "{body}");
        // The API socket is a socket.
        wait_for(Duration::from_secs(10), "the API socket", || {
            use std::os::unix::fs::FileTypeExt;
            std::fs::metadata(&sock)
                .map(|m| m.file_type().is_socket())
                .unwrap_or(false)
        });
    }
}

#[test]
fn traffic_to_the_outside_is_masqueraded_and_pod_to_pod_is_not() {
    let lab = up(LabSpec::new(lab_name("mq"), 2));
    assert_eq!(
        lab.check_until(Duration::from_secs(10)).unwrap().failed(),
        0
    );
    let h1 = host_state(&lab, "h1");
    let h2 = host_state(&lab, "h2");
    // The outside knows no route to the overlay: only masqueraded traffic can be answered.
    let seen = udp_source_seen(
        &lab,
        "h1/p1",
        "outside",
        "198.18.0.250",
        Duration::from_secs(5),
    );
    assert_eq!(seen, h1.public_ip.to_string(), "source seen outside");
    lab.exec("h2/p1", &["ping", "-c", "1", "-W", "2", "198.18.0.250"])
        .expect("masqueraded ping to the outside");
    // Inside the overlay, pods see each other's own addresses.
    let seen = udp_source_seen(
        &lab,
        "h1/p1",
        "h2/p1",
        &h2.pods[0].ip.to_string(),
        Duration::from_secs(5),
    );
    assert_eq!(seen, h1.pods[0].ip.to_string(), "source seen by a pod");
}

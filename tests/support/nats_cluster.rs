//! The nats-server configuration of a JetStream cluster on loopback, one
//! definition for the tests (`support::cluster`) and the benchmark
//! (`bench/procs.rs` includes this file).

/// The `server_name` and `cluster` lines of server `i` of a cluster whose
/// servers listen for routes on `route_ports` (each routes to the others).
pub fn cluster_block(name: &str, cluster: &str, i: usize, route_ports: &[u16]) -> String {
    let routes: Vec<String> = route_ports
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != i)
        .map(|(_, p)| format!("nats-route://127.0.0.1:{p}"))
        .collect();
    format!(
        "server_name: {name}\ncluster {{\n  name: {cluster}\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
        route_ports[i],
        routes.join(", ")
    )
}

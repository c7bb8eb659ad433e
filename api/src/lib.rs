//! tweedd's gRPC API types, shared by the agent (server) and `tweedctl net` (client).

pub mod v1 {
    tonic::include_proto!("tweed.v1");
}

/// Default path of the agent's API socket.
pub const DEFAULT_SOCKET: &str = "/run/tweed/tweedd.sock";

/// A client for the agent's unix socket.
pub async fn connect(
    socket: impl AsRef<std::path::Path>,
) -> Result<v1::agent_client::AgentClient<tonic::transport::Channel>, tonic::transport::Error> {
    let path = socket.as_ref().to_path_buf();
    // The URI is required by the API but unused: every connection goes to the socket.
    let channel = tonic::transport::Endpoint::from_static("http://tweedd.local")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await?;
    Ok(v1::agent_client::AgentClient::new(channel))
}

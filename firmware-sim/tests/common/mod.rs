//! A minimal agent for tests: accepts a register's WebSocket, reads its hello, sends requests and
//! collects events. It speaks the same `protocol::kkt` messages as the real agent.
#![allow(dead_code, clippy::unwrap_used, clippy::large_enum_variant)]

use futures_util::{SinkExt, StreamExt};
use protocol::kkt::*;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub const INN: &str = firmware_sim::fixtures::DEMO_INN;

pub struct Link {
    ws: WebSocketStream<TcpStream>,
    next_id: u64,
    pub hello: Hello,
    pub events: Vec<Event>,
}

pub enum Next {
    Message(KktMessage),
    Closed,
}

impl Link {
    /// Waits for a register to connect and say hello.
    pub async fn accept(listener: &TcpListener) -> Link {
        let (tcp, _) = listener.accept().await.expect("register connects");
        let mut ws = tokio_tungstenite::accept_async(tcp)
            .await
            .expect("handshake");
        let first = ws.next().await.expect("hello").expect("hello frame");
        let Message::Text(t) = first else {
            panic!("expected a text hello")
        };
        let KktMessage::Hello(hello) = KktMessage::from_json(t.as_str()).expect("valid hello")
        else {
            panic!("first message must be hello")
        };
        Link {
            ws,
            next_id: 1,
            hello,
            events: Vec::new(),
        }
    }

    pub async fn next(&mut self) -> Next {
        loop {
            match self.ws.next().await {
                None | Some(Err(_)) => return Next::Closed,
                Some(Ok(Message::Text(t))) => {
                    return Next::Message(KktMessage::from_json(t.as_str()).expect("valid message"))
                }
                Some(Ok(Message::Close(_))) => return Next::Closed,
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Sends a request; `None` when the link closed before the answer.
    pub async fn try_call(&mut self, call: Call) -> Option<Result<Reply, KktError>> {
        let id = self.next_id;
        self.next_id += 1;
        let msg = KktMessage::Request(Request { id, call });
        self.ws.send(Message::text(msg.to_json())).await.ok()?;
        loop {
            match self.next().await {
                Next::Closed => return None,
                Next::Message(KktMessage::Response(r)) => {
                    assert_eq!(r.id, id, "answers come in order");
                    return Some(r.outcome);
                }
                Next::Message(KktMessage::Event(e)) => self.events.push(e),
                Next::Message(other) => panic!("unexpected {other:?}"),
            }
        }
    }

    pub async fn call(&mut self, call: Call) -> Result<Reply, KktError> {
        self.try_call(call).await.expect("link stays up")
    }

    pub async fn fiscal(&mut self, call: Call) -> FiscalResult {
        match self.call(call).await {
            Ok(Reply::Fiscal(r)) => r,
            other => panic!("expected a fiscal result, got {other:?}"),
        }
    }

    pub async fn fn_info(&mut self) -> FnInfo {
        match self.call(Call::GetFnInfo).await {
            Ok(Reply::FnInfo(i)) => i,
            other => panic!("expected FN info, got {other:?}"),
        }
    }

    pub async fn ofd_status(&mut self) -> OfdExchangeStatus {
        match self.call(Call::OfdExchangeStatus).await {
            Ok(Reply::OfdExchange(s)) => s,
            other => panic!("expected OFD status, got {other:?}"),
        }
    }

    /// Waits (on events, not on time) until the FN owes the OFD nothing.
    pub async fn wait_all_acknowledged(&mut self) {
        if self.ofd_status().await.unsent_count == 0 {
            return;
        }
        loop {
            if let Some(Event::OfdAck(a)) = self.events.last() {
                if a.unsent_count == 0 {
                    return;
                }
            }
            match self.next().await {
                Next::Message(KktMessage::Event(e)) => self.events.push(e),
                Next::Message(other) => panic!("unexpected {other:?}"),
                Next::Closed => panic!("link closed while waiting for acknowledgements"),
            }
        }
    }
}

pub fn registration(zn: &str, ofd: std::net::SocketAddr) -> RegistrationParams {
    firmware_sim::fixtures::registration(zn, INN, firmware_sim::fixtures::ofd_endpoint(ofd))
        .unwrap()
}

pub fn receipt(n: u64) -> ReceiptParams {
    firmware_sim::fixtures::receipt(n, Some(format!("job-{n}")))
}

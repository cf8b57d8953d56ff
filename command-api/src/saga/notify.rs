//! Customer notifications: the port the outbox worker delivers through, a transport that only
//! logs (the default, for development and for deployments that mail elsewhere), and SMTP.
//!
//! The domain knows customers by id only, so the SMTP transport makes the address from the id
//! with a template (`{customer_id}` alone when ids are addresses); a real customer directory
//! would stand behind the same port.

use std::time::Duration;

use async_trait::async_trait;
use lettre::message::Mailbox;
use lettre::message::header::ContentType;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use orderly_domain::values::OrderId;
use uuid::Uuid;

use crate::CommandError;

/// One notification to a customer, as the outbox worker hands it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// The outbox message's id, the same on every delivery of this notice: a transport names
    /// its message by it (SMTP: the `Message-ID`), so a notice delivered again after a crash
    /// between sending and recording it reads as the same message to whoever deduplicates.
    pub id: Uuid,
    pub order_id: OrderId,
    /// `order-confirmed` or `order-cancelled`.
    pub template: String,
    pub customer_id: String,
    /// The cancellation reason, for `order-cancelled`.
    pub detail: Option<String>,
    /// Ties the message to the order's trace in the logs.
    pub correlation_id: Uuid,
}

impl Notice {
    fn subject(&self) -> String {
        match self.template.as_str() {
            "order-confirmed" => format!("Your order {} is confirmed", self.order_id),
            "order-cancelled" => format!("Your order {} was cancelled", self.order_id),
            other => format!("About your order {} ({other})", self.order_id),
        }
    }

    fn body(&self) -> String {
        let mut body = match self.template.as_str() {
            "order-confirmed" => format!(
                "Hello,\n\nyour order {} is paid and confirmed. We will tell you when it ships.\n",
                self.order_id
            ),
            "order-cancelled" => format!("Hello,\n\nyour order {} was cancelled.\n", self.order_id),
            _ => format!(
                "Hello,\n\nthere is news about your order {}.\n",
                self.order_id
            ),
        };
        if let Some(detail) = &self.detail {
            body.push_str(&format!("\nReason: {detail}\n"));
        }
        body
    }
}

/// Delivers notices. An error makes the outbox try again later, and dead-letter the message
/// after its last attempt; delivering the same notice twice must be tolerable (at least once).
#[async_trait]
pub trait Notifier: Send + Sync + 'static {
    async fn send(&self, notice: &Notice) -> Result<(), CommandError>;
}

/// Writes each notice to the log (target `orderly::notifications`) and succeeds.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogNotifier;

#[async_trait]
impl Notifier for LogNotifier {
    async fn send(&self, notice: &Notice) -> Result<(), CommandError> {
        tracing::info!(
            target: "orderly::notifications",
            notice_id = %notice.id,
            order_id = %notice.order_id,
            template = notice.template,
            customer_id = notice.customer_id,
            detail = notice.detail,
            correlation_id = %notice.correlation_id,
            "notification sent"
        );
        Ok(())
    }
}

/// How the SMTP transport is reached and addresses its mail.
#[derive(Clone)]
pub struct SmtpSettings {
    /// `smtp://host:port` (plain), `smtp://host?tls=required` (STARTTLS), `smtps://host`
    /// (TLS from the start); `user:password@` for authentication.
    pub url: String,
    /// The sender, e.g. `Orderly <orders@shop.example>`.
    pub from: String,
    /// The recipient address with `{customer_id}` replaced by the order's customer id.
    pub recipient: String,
    /// Longest one SMTP exchange may take.
    pub timeout: Duration,
}

/// Sends notices as plain-text mail through an SMTP server (connections pooled by lettre).
pub struct SmtpNotifier {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    recipient: String,
}

impl SmtpNotifier {
    /// Checks the URL, the sender and the recipient template now, so a typo stops the start
    /// instead of dead-lettering every notice. Build and drop it within a tokio runtime: the
    /// connection pool lives there.
    pub fn new(settings: &SmtpSettings) -> Result<Self, CommandError> {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(&settings.url)
            // lettre's message may quote the URL, password included: keep it out.
            .map_err(|_| CommandError::invalid("smtp_url", "is not a valid SMTP URL"))?
            .timeout(Some(settings.timeout))
            .build();
        let from = settings
            .from
            .parse()
            .map_err(|e| CommandError::invalid("smtp_from", e))?;
        if !settings.recipient.contains("{customer_id}") {
            return Err(CommandError::invalid(
                "smtp_recipient",
                "must contain {customer_id}",
            ));
        }
        Ok(Self {
            transport,
            from,
            recipient: settings.recipient.clone(),
        })
    }

    fn message(&self, notice: &Notice) -> Result<Message, CommandError> {
        let address = self.recipient.replace("{customer_id}", &notice.customer_id);
        // A customer id that makes no address fails every attempt alike; the dead letter
        // says why and an operator skips it.
        let to: Mailbox = address.parse().map_err(|e| {
            CommandError::Delivery(format!("no mail address for customer {address:?}: {e}"))
        })?;
        // Named by the notice, on the sender's domain: a redelivery is the same message.
        let message_id = format!("<{}@{}>", notice.id, self.from.email.domain());
        Message::builder()
            .message_id(Some(message_id))
            .from(self.from.clone())
            .to(to)
            .subject(notice.subject())
            .header(ContentType::TEXT_PLAIN)
            .body(notice.body())
            .map_err(|e| CommandError::Delivery(format!("cannot build the message: {e}")))
    }
}

#[async_trait]
impl Notifier for SmtpNotifier {
    async fn send(&self, notice: &Notice) -> Result<(), CommandError> {
        let message = self.message(notice)?;
        self.transport
            .send(message)
            .await
            .map_err(|e| CommandError::Delivery(format!("SMTP: {e}")))?;
        tracing::info!(
            target: "orderly::notifications",
            notice_id = %notice.id,
            order_id = %notice.order_id,
            template = notice.template,
            correlation_id = %notice.correlation_id,
            "notification mailed"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(recipient: &str) -> SmtpSettings {
        SmtpSettings {
            url: "smtp://127.0.0.1:2525".into(),
            from: "Orderly <orders@shop.example>".into(),
            recipient: recipient.into(),
            timeout: Duration::from_secs(5),
        }
    }

    fn notice(customer_id: &str) -> Notice {
        Notice {
            id: Uuid::from_u128(7),
            order_id: OrderId(Uuid::nil()),
            template: "order-cancelled".into(),
            customer_id: customer_id.into(),
            detail: Some("out of stock".into()),
            correlation_id: Uuid::nil(),
        }
    }

    // The transport's connection pool needs a runtime to drop in.
    #[tokio::test]
    async fn the_recipient_is_made_from_the_customer_id_and_the_reason_is_in_the_body() {
        let smtp = SmtpNotifier::new(&settings("{customer_id}@customers.shop.example")).unwrap();
        let message = smtp.message(&notice("alice")).unwrap();
        let text = String::from_utf8(message.formatted()).unwrap();
        assert!(text.contains("To: alice@customers.shop.example"), "{text}");
        assert!(text.contains("was cancelled"), "{text}");
        assert!(text.contains("Reason: out of stock"), "{text}");
    }

    #[tokio::test]
    async fn a_notice_mailed_again_is_the_same_message_to_the_recipient() {
        let notifier = || SmtpNotifier::new(&settings("{customer_id}@customers.shop.example"));
        let message_id = |smtp: &SmtpNotifier, notice: &Notice| {
            let text = String::from_utf8(smtp.message(notice).unwrap().formatted()).unwrap();
            text.lines()
                .find_map(|line| line.strip_prefix("Message-ID: ").map(str::to_owned))
                .unwrap_or_else(|| panic!("no Message-ID in {text}"))
        };
        let smtp = notifier().unwrap();
        let first = notice("alice");
        assert_eq!(
            message_id(&smtp, &first),
            "<00000000-0000-0000-0000-000000000007@shop.example>"
        );
        // Delivered again after a crash: the notice read back from the outbox (an equal value
        // built anew) by a notifier built anew is named the same.
        let restarted = notifier().unwrap();
        assert_eq!(
            message_id(&restarted, &notice("alice")),
            message_id(&smtp, &first)
        );
        // Another notice (another outbox message, even for the same order and customer, or
        // for another order altogether) is another message.
        let same_order = Notice {
            id: Uuid::from_u128(8),
            ..first.clone()
        };
        let other_order = Notice {
            // Equal to the first's id in its low half: the whole id names the message.
            id: Uuid::from_u128((1 << 64) | 7),
            order_id: OrderId(Uuid::from_u128(1)),
            template: "order-confirmed".into(),
            detail: None,
            ..notice("bob")
        };
        let ids: std::collections::BTreeSet<String> = [&first, &same_order, &other_order]
            .into_iter()
            .map(|notice| message_id(&smtp, notice))
            .collect();
        assert_eq!(ids.len(), 3, "{ids:?}");
    }

    #[tokio::test]
    async fn a_customer_id_that_makes_no_address_is_a_delivery_error() {
        let smtp = SmtpNotifier::new(&settings("{customer_id}")).unwrap();
        let error = smtp.message(&notice("alice")).unwrap_err();
        assert!(matches!(error, CommandError::Delivery(_)), "{error}");
    }

    #[tokio::test]
    async fn bad_settings_stop_the_start_without_echoing_the_password() {
        let bad_url = SmtpSettings {
            url: "gopher://user:hunter2@mail".into(),
            ..settings("{customer_id}")
        };
        let error = SmtpNotifier::new(&bad_url).err().unwrap().to_string();
        assert!(
            error.contains("smtp_url") && !error.contains("hunter2"),
            "{error}"
        );
        assert!(SmtpNotifier::new(&settings("orders@shop.example")).is_err());
        let bad_from = SmtpSettings {
            from: "not an address".into(),
            ..settings("{customer_id}")
        };
        assert!(SmtpNotifier::new(&bad_from).is_err());
    }
}

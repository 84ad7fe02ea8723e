//! Sender allowlists that follow DNS TXT records, as Withings asks its
//! receivers to do ("refer to the TXT record from
//! ipblock-notify.withings.net … make sure you monitor it").
//!
//! Being built: [`record`] reads what a record says, [`lookup`] asks DNS
//! for it, [`followed`] keeps the last good answer and says what each new
//! one changes; the refresher (on a timer, the last good answer kept with
//! the store, metrics and the change log) comes next.

pub mod followed;
pub mod lookup;
pub mod record;

//! A consistent snapshot of the orders at one sequence, taken without
//! stopping the writer: read everything, then re-read the orders that
//! events committed meanwhile touched, until a round finds nothing newer.
//! Every order then reflects exactly the events up to the returned sequence,
//! so a stream can continue from there with no gap and no duplicate.

use std::collections::{BTreeMap, BTreeSet};

use super::{EventFilter, FeedError, Store, StoreError};
use crate::proto::Order;

/// Rounds of re-reading before giving up under a write load that keeps
/// touching the same orders.
const MAX_ROUNDS: usize = 64;

impl Store {
    /// The orders `matches` selects, and the sequence they reflect.
    pub async fn snapshot<F>(&self, matches: F) -> Result<(Vec<Order>, u64), FeedError>
    where
        F: Fn(&Order) -> bool + Clone + Send + 'static,
    {
        let start = self.head_sequence();
        let (mut orders, mut cut) = self.scan_orders(matches.clone()).await?;
        cut = cut.max(start);
        let mut scanned = start;
        for _ in 0..MAX_ROUNDS {
            self.wait_durable(cut).await?;
            let (reread, newest) = self.reread_touched(scanned, cut, &matches).await?;
            for (id, order) in reread {
                match order {
                    Some(order) => orders.insert(id, order),
                    None => orders.remove(&id),
                };
            }
            scanned = cut;
            if newest <= cut {
                return Ok((orders.into_values().collect(), cut));
            }
            cut = newest;
        }
        Err(StoreError::unavailable_because("no consistent snapshot under this write load; retry").into())
    }

    /// Every matching order, and the newest sequence any order reflects.
    async fn scan_orders(
        &self,
        matches: impl Fn(&Order) -> bool + Send + 'static,
    ) -> Result<(BTreeMap<u64, Order>, u64), StoreError> {
        self.read_off_runtime(move |engine| {
            let mut orders = BTreeMap::new();
            let mut newest = 0;
            for order in engine.orders_after(0) {
                let order = order?;
                newest = newest.max(order.last_sequence);
                if matches(&order) {
                    orders.insert(order.id, order);
                }
            }
            Ok((orders, newest))
        })
        .await
    }

    /// Re-reads the orders touched by events in `(from, to]`: each as it is
    /// now if it matches (`None` if not), and the newest sequence they reflect.
    async fn reread_touched(&self, from: u64, to: u64, matches: &impl Fn(&Order) -> bool) -> Result<Reread, FeedError> {
        let mut touched = BTreeSet::new();
        let mut after = from;
        while after < to {
            let limit = super::PageLimit { items: 1000, bytes: usize::MAX };
            let page = self.list_events(&EventFilter::default(), after, limit).await?;
            let mut expected = after + 1;
            for event in page.items.iter().take_while(|e| e.sequence <= to) {
                if event.sequence != expected {
                    return Err(FeedError::OutOfRange { requested: from, oldest: self.oldest_retained() });
                }
                touched.insert(event.order_id);
                expected += 1;
            }
            if expected == after + 1 {
                return Err(FeedError::OutOfRange { requested: from, oldest: self.oldest_retained() });
            }
            after = expected - 1;
        }
        let mut newest = to;
        let mut reread = Vec::with_capacity(touched.len());
        for id in touched {
            let order = self.order(id).await?;
            newest = newest.max(order.as_ref().map_or(0, |o| o.last_sequence));
            reread.push((id, order.filter(|o| matches(o))));
        }
        Ok((reread, newest))
    }
}

/// Re-read orders (`None`: no longer matching) and the newest sequence.
type Reread = (Vec<(u64, Option<Order>)>, u64);

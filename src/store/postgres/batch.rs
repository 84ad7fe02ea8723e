//! One batch on PostgreSQL: one transaction that takes the counter row's
//! lock first, reads what the batch needs under it (so no other node
//! changes those rows meanwhile), plans ([`crate::store::plan`]), writes
//! the write set with set-based statements, moves the counters and commits.
//!
//! The counter row's lock is held to COMMIT, so batches of all nodes commit
//! one after another and the sequences they take are dense and in commit
//! order; a batch that rolls back takes none. Taking the lock first rather
//! than last costs overlap between nodes, and buys reads that no other
//! node can invalidate before the commit.

use std::collections::BTreeMap;

use prost::Message;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};

use crate::proto::{DeliveryOutcome, StoredOrder};
use crate::store::StoreError;
use crate::store::plan::{
    self, Counters, DedupEntry, DedupKey, Found, Planned, RefKey, RefKind, UnmappedKey, Wants, WithHistory, Work,
    WriteSet, decode_raw,
};

/// The writer's statements, prepared once per connection (one round trip
/// each saved per batch). The statements of a batch are sent together, so
/// none depends on another's having run first (see [`write`]).
pub(crate) struct Prepared {
    begin: Statement,
    commit: Statement,
    rollback: Statement,
    /// The counter row, locked to COMMIT.
    lock: Statement,
    /// The counter row, not locked (the negative control only).
    peek: Statement,
    read_dedup: Statement,
    read_refs: Statement,
    read_orders: Statement,
    read_raws: Statement,
    read_unmapped: Statement,
    raw: Statement,
    quarantine: Statement,
    events: Statement,
    pruned: Statement,
    orders: Statement,
    counters: Statement,
    notify: Statement,
    index: Statement,
    dedup: Statement,
    unmapped: Statement,
}

impl Prepared {
    pub(crate) async fn on(client: &Client) -> Result<Self, StoreError> {
        // The statements take arrays whose length varies per batch: a
        // generic plan (chosen after five runs) guesses their size and
        // scanned whole tables; a plan made for each run's arrays halved
        // the time of a batch (`cluster` bench: 3,500 -> 5,400 webhooks/s).
        client.batch_execute("SET plan_cache_mode = force_custom_plan").await.map_err(failed)?;
        let counters = "SELECT last_sequence, last_raw, last_order FROM ot_counters WHERE id = 1";
        let locked = format!("{counters} FOR UPDATE");
        let (begin, commit, rollback, lock, peek) = tokio::try_join!(
            client.prepare("BEGIN"),
            client.prepare("COMMIT"),
            client.prepare("ROLLBACK"),
            client.prepare(&locked),
            client.prepare(counters),
        )
        .map_err(failed)?;
        let (read_dedup, read_refs, read_orders, read_raws, read_unmapped) = tokio::try_join!(
            client.prepare(
                "SELECT d.source, d.key, d.raw_id, d.outcome FROM ot_dedup d
                 JOIN unnest($1::text[], $2::text[]) AS w(source, key) USING (source, key)"
            ),
            client.prepare(
                "SELECT i.kind, i.value, i.source, i.order_id FROM ot_index i
                 JOIN unnest($1::int2[], $2::text[], $3::text[]) AS w(kind, value, source) USING (kind, value, source)
                 ORDER BY i.order_id"
            ),
            client.prepare("SELECT id, stored FROM ot_orders WHERE id = ANY($1)"),
            client.prepare("SELECT id, record, quarantined FROM ot_raw WHERE id = ANY($1)"),
            client.prepare(
                "SELECT u.provider, u.applies_to, u.value, u.count FROM ot_unmapped u
                 JOIN unnest($1::text[], $2::text[], $3::text[]) AS w(provider, applies_to, value)
                 USING (provider, applies_to, value)"
            ),
        )
        .map_err(failed)?;
        let (raw, quarantine, events, pruned, orders, counters, notify, index, dedup, unmapped) = tokio::try_join!(
            client.prepare(
                "INSERT INTO ot_raw (id, record, quarantined)
                 SELECT * FROM unnest($1::int8[], $2::bytea[], $3::bool[])
                 ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record"
            ),
            client.prepare(
                "UPDATE ot_raw SET quarantined = q.flag FROM unnest($1::int8[], $2::bool[]) AS q(id, flag)
             WHERE ot_raw.id = q.id"
            ),
            client.prepare("INSERT INTO ot_events SELECT * FROM unnest($1::int8[], $2::bytea[])"),
            client.prepare("DELETE FROM ot_events WHERE sequence = ANY($1)"),
            client.prepare(
                "INSERT INTO ot_orders SELECT * FROM unnest($1::int8[], $2::bytea[])
             ON CONFLICT (id) DO UPDATE SET stored = EXCLUDED.stored"
            ),
            client.prepare("UPDATE ot_counters SET last_sequence = $1, last_raw = $2, last_order = $3 WHERE id = 1"),
            client.prepare("SELECT pg_notify($1, '')"),
            client.prepare(
                "INSERT INTO ot_index SELECT * FROM unnest($1::int2[], $2::text[], $3::text[], $4::int8[])
             ON CONFLICT DO NOTHING"
            ),
            client.prepare(
                "INSERT INTO ot_dedup SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::int2[])
             ON CONFLICT (source, key) DO UPDATE SET raw_id = EXCLUDED.raw_id, outcome = EXCLUDED.outcome"
            ),
            client.prepare(
                "INSERT INTO ot_unmapped SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[])
             ON CONFLICT (provider, applies_to, value) DO UPDATE SET count = EXCLUDED.count"
            ),
        )
        .map_err(failed)?;
        Ok(Self {
            begin,
            commit,
            rollback,
            lock,
            peek,
            read_dedup,
            read_refs,
            read_orders,
            read_raws,
            read_unmapped,
            raw,
            quarantine,
            events,
            pruned,
            orders,
            counters,
            notify,
            index,
            dedup,
            unmapped,
        })
    }
}

/// Plans and commits `batch`; when this returns `Ok`, the write set is
/// durable (COMMIT returned, with `synchronous_commit` on).
///
/// PostgreSQL does not apply `statement_timeout` to a COMMIT's wait for a
/// synchronous standby: a standby that stops confirming would hold the
/// COMMIT, and with it this node's writer and every node's batches (the
/// counter row), for ever. So the COMMIT runs under `commit_timeout` here.
/// Past it the outcome is unknown: the batch fails (503), the connection is
/// given up with the engine (never cancelled: a cancelled wait is answered
/// with success and a warning), and a retry of the same delivery is made
/// safe by dedup.
///
/// `outside_the_lock` is the negative control of the sequencing (test
/// builds only; `None` otherwise): numbers are reserved on that second
/// connection and committed at once, as a plain sequence hands them out,
/// and the counter row is neither locked nor moved by the batch.
pub(crate) async fn commit_batch(
    client: &mut Client,
    prepared: &Prepared,
    batch: &[Work],
    retain_events: u64,
    commit_timeout: std::time::Duration,
    outside_the_lock: Option<&Client>,
    before_commit: &mut (dyn FnMut(&Planned) + Send),
) -> Result<Planned, StoreError> {
    let client = &*client;
    let planned = match plan_locked(client, prepared, batch, retain_events, outside_the_lock).await {
        Ok(planned) => planned,
        Err(e) => {
            // Frees the counter row at once (the connection is given up
            // with the engine anyway).
            let _ = client.execute(&prepared.rollback, &[]).await;
            return Err(e);
        }
    };
    before_commit(&planned);
    let write_and_commit = async {
        if planned.outcomes.iter().any(Result::is_ok) {
            let wrote = write(client, prepared, &planned.writes, outside_the_lock.is_none());
            // Sent behind the writes: when one of them failed, COMMIT ends
            // the aborted transaction with a rollback, and the write's
            // error is what is returned.
            let (wrote, committed) = tokio::join!(wrote, client.execute(&prepared.commit, &[]));
            wrote?;
            committed.map_err(failed)?;
        } else {
            client.execute(&prepared.commit, &[]).await.map_err(failed)?;
        }
        Ok::<_, StoreError>(())
    };
    match tokio::time::timeout(commit_timeout, write_and_commit).await {
        Ok(committed) => committed?,
        Err(_) => {
            return Err(StoreError::unavailable_because(
                "COMMIT did not return in time (is a synchronous standby unreachable?); its outcome is unknown",
            ));
        }
    }
    Ok(planned)
}

/// Begins the batch's transaction, takes the counter row, reads what the
/// batch needs and plans it. BEGIN, the lock and the first reads are sent
/// together: the server runs them in that order, so every read sees what
/// was committed before the lock was granted.
async fn plan_locked(
    client: &Client,
    prepared: &Prepared,
    batch: &[Work],
    retain_events: u64,
    outside_the_lock: Option<&Client>,
) -> Result<Planned, StoreError> {
    let lock = if outside_the_lock.is_some() { &prepared.peek } else { &prepared.lock };
    let first = plan::first_wants(batch);
    let (_, row, mut found) = tokio::try_join!(
        async { client.execute(&prepared.begin, &[]).await.map_err(failed) },
        async { client.query_one(lock, &[]).await.map_err(failed) },
        read(client, prepared, &first),
    )?;
    let counters =
        Counters { last_sequence: as_u64(row.get(0)), last_raw: as_u64(row.get(1)), last_order: as_u64(row.get(2)) };
    let orders = plan::order_wants(&found);
    if !orders.is_empty() {
        found.absorb(read(client, prepared, &orders).await?);
    }
    let mut planned = loop {
        match plan::plan(batch, counters, &found, retain_events) {
            Ok(planned) => break planned,
            Err(wants) => found.absorb(read(client, prepared, &wants).await?),
        }
    };
    if let Some(sequencer) = outside_the_lock {
        let numbered = reserve(sequencer, counters, planned.writes.counters).await?;
        planned = plan::plan(batch, numbered, &found, retain_events)
            .map_err(|_| StoreError::unavailable_because("planning the same batch again asked for other reads"))?;
    }
    Ok(planned)
}

/// Reserves as many numbers as a batch planned from `from` up to `to` took,
/// committed at once on `sequencer`; returns the counters to number from.
async fn reserve(sequencer: &Client, from: Counters, to: Counters) -> Result<Counters, StoreError> {
    let taken = [to.last_sequence - from.last_sequence, to.last_raw - from.last_raw, to.last_order - from.last_order]
        .map(as_i64);
    let row = sequencer
        .query_one(
            "UPDATE ot_counters SET last_sequence = last_sequence + $1, last_raw = last_raw + $2,
                 last_order = last_order + $3 WHERE id = 1
             RETURNING last_sequence - $1, last_raw - $2, last_order - $3",
            &[&taken[0], &taken[1], &taken[2]],
        )
        .await
        .map_err(failed)?;
    Ok(Counters { last_sequence: as_u64(row.get(0)), last_raw: as_u64(row.get(1)), last_order: as_u64(row.get(2)) })
}

fn failed(e: tokio_postgres::Error) -> StoreError {
    StoreError::unavailable("the batch transaction failed", e)
}

fn as_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn as_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub(super) fn kind_code(kind: RefKind) -> i16 {
    match kind {
        RefKind::Merchant => 1,
        RefKind::ProviderOrder => 2,
        RefKind::Safe => 3,
        RefKind::Tracking => 4,
    }
}

fn kind_of(code: i16) -> Option<RefKind> {
    [RefKind::Merchant, RefKind::ProviderOrder, RefKind::Safe, RefKind::Tracking]
        .into_iter()
        .find(|kind| kind_code(*kind) == code)
}

/// One statement per kind of key, sent together.
async fn read(client: &Client, prepared: &Prepared, wants: &Wants) -> Result<Found, StoreError> {
    let (dedup_sources, dedup_keys): (Vec<&str>, Vec<&str>) =
        wants.dedup.iter().map(|k| (k.source.as_str(), k.key.as_str())).unzip();
    let ref_kinds: Vec<i16> = wants.refs.iter().map(|k| kind_code(k.kind)).collect();
    let ref_values: Vec<&str> = wants.refs.iter().map(|k| k.value.as_str()).collect();
    let ref_sources: Vec<&str> = wants.refs.iter().map(|k| k.source.as_str()).collect();
    let order_ids: Vec<i64> = wants.orders.iter().map(|id| as_i64(*id)).collect();
    let raw_ids: Vec<i64> = wants.raws.iter().map(|id| as_i64(*id)).collect();
    let providers: Vec<&str> = wants.unmapped.iter().map(|k| k.provider.as_str()).collect();
    let applies: Vec<&str> = wants.unmapped.iter().map(|k| k.applies_to.as_str()).collect();
    let unmapped_values: Vec<&str> = wants.unmapped.iter().map(|k| k.value.as_str()).collect();
    let dedup_params: [&(dyn ToSql + Sync); 2] = [&dedup_sources, &dedup_keys];
    let ref_params: [&(dyn ToSql + Sync); 3] = [&ref_kinds, &ref_values, &ref_sources];
    let order_params: [&(dyn ToSql + Sync); 1] = [&order_ids];
    let raw_params: [&(dyn ToSql + Sync); 1] = [&raw_ids];
    let unmapped_params: [&(dyn ToSql + Sync); 3] = [&providers, &applies, &unmapped_values];
    let (dedup, refs, orders, raws, unmapped) = tokio::try_join!(
        rows(client, !dedup_keys.is_empty(), &prepared.read_dedup, &dedup_params),
        rows(client, !ref_values.is_empty(), &prepared.read_refs, &ref_params),
        rows(client, !order_ids.is_empty(), &prepared.read_orders, &order_params),
        rows(client, !raw_ids.is_empty(), &prepared.read_raws, &raw_params),
        rows(client, !providers.is_empty(), &prepared.read_unmapped, &unmapped_params),
    )
    .map_err(failed)?;
    let mut found = Found {
        dedup: wants.dedup.iter().map(|k| (k.clone(), None)).collect(),
        refs: wants.refs.iter().map(|k| (k.clone(), Vec::new())).collect(),
        orders: wants.orders.iter().map(|id| (*id, Ok(None))).collect(),
        raws: wants.raws.iter().map(|id| (*id, Ok(None))).collect(),
        unmapped: wants.unmapped.iter().map(|k| (k.clone(), 0)).collect(),
    };
    for row in dedup {
        let key = DedupKey { source: row.get(0), key: row.get(1) };
        let outcome = match row.get::<_, i16>(3) {
            2 => DeliveryOutcome::Quarantined,
            _ => DeliveryOutcome::Applied,
        };
        found.dedup.insert(key, Some(DedupEntry { raw_id: as_u64(row.get(2)), outcome }));
    }
    for row in refs {
        let Some(kind) = kind_of(row.get(0)) else { continue };
        let key = RefKey { kind, value: row.get(1), source: row.get(2) };
        found.refs.entry(key).or_default().push(as_u64(row.get(3)));
    }
    for row in orders {
        found.orders.insert(as_u64(row.get(0)), decode_order(row.get(1)).map(Some));
    }
    for row in raws {
        let raw = decode_raw(row.get::<_, &[u8]>(1)).map(|raw| Some((raw, row.get(2))));
        found.raws.insert(as_u64(row.get(0)), raw);
    }
    for row in unmapped {
        let key = UnmappedKey { provider: row.get(0), applies_to: row.get(1), value: row.get(2) };
        found.unmapped.insert(key, as_u64(row.get(3)));
    }
    Ok(found)
}

/// The rows of `statement` when `run` (none is sent for an empty key set).
async fn rows(
    client: &Client,
    run: bool,
    statement: &Statement,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    match run {
        true => client.query(statement, params).await,
        false => Ok(Vec::new()),
    }
}

fn decode_order(stored: &[u8]) -> Result<WithHistory, StoreError> {
    let stored = StoredOrder::decode(stored)?;
    Ok((stored.order.unwrap_or_default(), stored.event_sequences))
}

/// Writes the write set, one statement per table that changes, sent
/// together (pipelined on the connection: one round trip, not one per
/// statement); moves the counter row unless the numbers were reserved
/// outside it, and notifies the followers when there are events.
async fn write(tx: &Client, prepared: &Prepared, writes: &WriteSet, move_counters: bool) -> Result<(), StoreError> {
    // Order-free: a new raw record carries its quarantine flag (the UPDATE
    // is for records stored before), and an event both written and pruned
    // by this batch is simply not written.
    let quarantine: BTreeMap<u64, bool> = writes.quarantine.iter().map(|(id, q)| (*id, *q)).collect();
    let raw_ids: Vec<i64> = writes.raws.iter().map(|r| as_i64(r.id)).collect();
    let records: Vec<Vec<u8>> = writes.raws.iter().map(Message::encode_to_vec).collect();
    let raw_flags: Vec<bool> = writes.raws.iter().map(|r| quarantine.get(&r.id).copied().unwrap_or(false)).collect();
    let (quarantine_ids, flags): (Vec<i64>, Vec<bool>) = quarantine.iter().map(|(id, q)| (as_i64(*id), *q)).unzip();
    let pruned_now: std::collections::BTreeSet<u64> = writes.pruned_events.iter().copied().collect();
    let (sequences, events): (Vec<i64>, Vec<&[u8]>) = writes
        .events
        .iter()
        .filter(|(sequence, _)| !pruned_now.contains(sequence))
        .map(|(sequence, event)| (as_i64(*sequence), event.as_ref()))
        .unzip();
    let written: std::collections::BTreeSet<u64> = writes.events.iter().map(|(sequence, _)| *sequence).collect();
    let pruned: Vec<i64> =
        writes.pruned_events.iter().filter(|sequence| !written.contains(sequence)).map(|s| as_i64(*s)).collect();
    let order_ids: Vec<i64> = writes.orders.keys().map(|id| as_i64(*id)).collect();
    let stored: Vec<Vec<u8>> = writes
        .orders
        .values()
        .map(|(order, history)| {
            StoredOrder { order: Some(order.clone()), event_sequences: history.clone() }.encode_to_vec()
        })
        .collect();
    let c = writes.counters;
    let counters = [c.last_sequence, c.last_raw, c.last_order].map(as_i64);
    let params_1: [&(dyn ToSql + Sync); 3] = [&raw_ids, &records, &raw_flags];
    let params_2: [&(dyn ToSql + Sync); 2] = [&quarantine_ids, &flags];
    let params_3: [&(dyn ToSql + Sync); 2] = [&sequences, &events];
    let params_4: [&(dyn ToSql + Sync); 1] = [&pruned];
    let params_5: [&(dyn ToSql + Sync); 2] = [&order_ids, &stored];
    let params_6: [&(dyn ToSql + Sync); 3] = [&counters[0], &counters[1], &counters[2]];
    let params_7: [&(dyn ToSql + Sync); 1] = [&super::engine::CHANNEL];
    tokio::try_join!(
        statement(tx, !raw_ids.is_empty(), &prepared.raw, &params_1),
        statement(tx, !quarantine_ids.is_empty(), &prepared.quarantine, &params_2),
        statement(tx, !sequences.is_empty(), &prepared.events, &params_3),
        statement(tx, !pruned.is_empty(), &prepared.pruned, &params_4),
        statement(tx, !order_ids.is_empty(), &prepared.orders, &params_5),
        write_index_and_dedup(tx, prepared, writes),
        statement(tx, move_counters, &prepared.counters, &params_6),
        // Delivered at COMMIT: a wake-up for every node's follower.
        statement(tx, !writes.events.is_empty(), &prepared.notify, &params_7),
    )
    .map_err(failed)?;
    Ok(())
}

/// Runs `statement` when `run` (one whose arrays are empty is not sent).
async fn statement(
    tx: &Client,
    run: bool,
    statement: &Statement,
    params: &[&(dyn ToSql + Sync)],
) -> Result<(), tokio_postgres::Error> {
    if run {
        tx.execute(statement, params).await?;
    }
    Ok(())
}

/// The index, dedup and unmapped-status writes (sent with the others).
async fn write_index_and_dedup(
    tx: &Client,
    prepared: &Prepared,
    writes: &WriteSet,
) -> Result<(), tokio_postgres::Error> {
    let entries: Vec<(&RefKey, u64)> =
        writes.index.iter().flat_map(|(key, add)| add.ids.iter().map(move |id| (key, *id))).collect();
    let kinds: Vec<i16> = entries.iter().map(|(k, _)| kind_code(k.kind)).collect();
    let values: Vec<&str> = entries.iter().map(|(k, _)| k.value.as_str()).collect();
    let sources: Vec<&str> = entries.iter().map(|(k, _)| k.source.as_str()).collect();
    let ids: Vec<i64> = entries.iter().map(|(_, id)| as_i64(*id)).collect();
    let dedup_sources: Vec<&str> = writes.dedup.iter().map(|(k, _)| k.source.as_str()).collect();
    let keys: Vec<&str> = writes.dedup.iter().map(|(k, _)| k.key.as_str()).collect();
    let raw_ids: Vec<i64> = writes.dedup.iter().map(|(_, e)| as_i64(e.raw_id)).collect();
    let outcomes: Vec<i16> = writes.dedup.iter().map(|(_, e)| e.outcome as i16).collect();
    let providers: Vec<&str> = writes.unmapped.keys().map(|k| k.provider.as_str()).collect();
    let applies: Vec<&str> = writes.unmapped.keys().map(|k| k.applies_to.as_str()).collect();
    let unmapped: Vec<&str> = writes.unmapped.keys().map(|k| k.value.as_str()).collect();
    let counts: Vec<i64> = writes.unmapped.values().map(|c| as_i64(*c)).collect();
    let params_1: [&(dyn ToSql + Sync); 4] = [&kinds, &values, &sources, &ids];
    let params_2: [&(dyn ToSql + Sync); 4] = [&dedup_sources, &keys, &raw_ids, &outcomes];
    let params_3: [&(dyn ToSql + Sync); 4] = [&providers, &applies, &unmapped, &counts];
    tokio::try_join!(
        statement(tx, !ids.is_empty(), &prepared.index, &params_1),
        statement(tx, !keys.is_empty(), &prepared.dedup, &params_2),
        statement(tx, !counts.is_empty(), &prepared.unmapped, &params_3),
    )?;
    Ok(())
}

//! The saga's data: the events both services exchange and the state each
//! keeps, and the two handlers.
//!
//! ```text
//! orders                         payments
//!   place ── orders.placed ──▶   reserve (or refuse: insufficient funds)
//!         ◀── payments.reserved / payments.refused
//!   confirm (stock left) or cancel
//!         ── orders.confirmed ─▶ capture
//!         ── orders.cancelled ─▶ release the reservation (compensation)
//! ```

use outboxkv::inbox::InboxTx;
use outboxkv::{Error, Event, Table};
use serde::{Deserialize, Serialize};

/// Customers 0..CUSTOMERS; see [`initial_balance`].
pub const CUSTOMERS: u64 = 10;
/// What customers start with, in cents, but customer 0.
pub const BALANCE: i64 = 2_000;

/// Customer `c`'s starting balance: customer 0 has 5 cents, less than any
/// order, so its orders are refused (the saga's refusal path); the others
/// have [`BALANCE`].
pub fn initial_balance(c: u64) -> i64 {
    if c == 0 { 5 } else { BALANCE }
}

/// Units the orders service can sell: fewer than the orders customers can
/// pay for, so some orders are cancelled after their payment was reserved
/// (the compensation path).
pub const STOCK: u64 = 250;

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderStatus {
    Pending,
    Confirmed,
    Cancelled,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Order {
    pub customer: u64,
    pub amount: i64,
    pub status: OrderStatus,
    pub reason: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    Reserved,
    Refused,
    Captured,
    Released,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Reservation {
    pub customer: u64,
    pub amount: i64,
    pub hold: Hold,
}

/// The orders service's state.
pub const ORDERS: Table<u64, Order> = Table::new("orders");
pub const STOCK_LEFT: Table<str, u64> = Table::new("stock");
/// The payments service's state.
pub const BALANCES: Table<u64, i64> = Table::new("balances");
pub const RESERVATIONS: Table<u64, Reservation> = Table::new("reservations");
/// Both services: consumed event id -> times a handler's commit applied
/// it. The handlers are safe to meet a message twice by their state alone;
/// this count shows the inbox did not let one through twice (checked by
/// `tests/saga.rs`).
pub const HANDLED: Table<str, u64> = Table::new("handled");

/// Every event of the saga carries the order and what the receiver needs.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Step {
    pub order: u64,
    pub customer: u64,
    pub amount: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Order `i`'s customer and amount.
pub fn order_terms(i: u64) -> (u64, i64) {
    (i % CUSTOMERS, 10 + ((i * 7) % 90) as i64)
}

/// Places order `i` unless it exists: the order and its `orders.placed`
/// event in one commit. `false`: it existed.
pub fn place(tx: &mut outboxkv::WriteTx<'_>, i: u64) -> outboxkv::Result<bool> {
    if tx.get_for_update(&ORDERS, &i)?.is_some() {
        return Ok(false);
    }
    let (customer, amount) = order_terms(i);
    tx.put(
        &ORDERS,
        &i,
        &Order {
            customer,
            amount,
            status: OrderStatus::Pending,
            reason: None,
        },
    )?;
    let step = Step {
        order: i,
        customer,
        amount,
        reason: None,
    };
    tx.emit(Event::json("orders.placed", i.to_string(), &step)?)?;
    Ok(true)
}

fn step_of(tx: &InboxTx<'_, '_>) -> outboxkv::Result<(String, Step)> {
    let m = tx.message();
    let event = m
        .event
        .as_ref()
        .ok_or_else(|| Error::abort(format!("not a CloudEvent: {:?}", m.event_error)))?;
    let step: Step = serde_json::from_slice(&event.data).map_err(Error::abort)?;
    Ok((event.event_type.clone(), step))
}

/// Counts the message in [`HANDLED`], in the handler's transaction.
fn count(tx: &mut InboxTx<'_, '_>) -> outboxkv::Result<()> {
    let Some(id) = tx.message().event.as_ref().map(|e| e.id.clone()) else {
        return Ok(());
    };
    let n = tx.get_for_update(&HANDLED, &id)?.unwrap_or(0);
    tx.put(&HANDLED, &id, &(n + 1))
}

/// The orders service's handler: a payment decision confirms or cancels
/// the order.
pub fn orders_handler(tx: &mut InboxTx<'_, '_>) -> outboxkv::Result<()> {
    let (kind, step) = step_of(tx)?;
    count(tx)?;
    if matches!(kind.as_str(), "payments.captured" | "payments.released") {
        // The saga's last steps, for other readers: nothing to do here.
        return Ok(());
    }
    let Some(mut order) = tx.get_for_update(&ORDERS, &step.order)? else {
        return Err(Error::abort(format!(
            "{kind} for unknown order {}",
            step.order
        )));
    };
    if order.status != OrderStatus::Pending {
        // Decided already: nothing to do (the inbox makes this rare; a
        // handler should still be safe to meet it).
        return Ok(());
    }
    match kind.as_str() {
        "payments.reserved" => {
            let stock = tx.get_for_update(&STOCK_LEFT, "units")?.unwrap_or(STOCK);
            if stock > 0 {
                tx.put(&STOCK_LEFT, "units", &(stock - 1))?;
                order.status = OrderStatus::Confirmed;
                tx.emit(Event::json(
                    "orders.confirmed",
                    step.order.to_string(),
                    &step,
                )?)?;
            } else {
                order.status = OrderStatus::Cancelled;
                order.reason = Some("out of stock".into());
                let step = Step {
                    reason: order.reason.clone(),
                    ..step
                };
                tx.emit(Event::json(
                    "orders.cancelled",
                    step.order.to_string(),
                    &step,
                )?)?;
            }
        }
        "payments.refused" => {
            order.status = OrderStatus::Cancelled;
            order.reason = step.reason.clone();
            tx.emit(Event::json(
                "orders.cancelled",
                step.order.to_string(),
                &step,
            )?)?;
        }
        other => return Err(Error::abort(format!("orders does not handle {other}"))),
    }
    tx.put(&ORDERS, &step.order, &order)
}

/// The payments service's handler: reserve or refuse a placed order,
/// capture a confirmed one, release a cancelled one's reservation.
pub fn payments_handler(tx: &mut InboxTx<'_, '_>) -> outboxkv::Result<()> {
    let (kind, step) = step_of(tx)?;
    count(tx)?;
    let existing = tx.get_for_update(&RESERVATIONS, &step.order)?;
    match (kind.as_str(), existing) {
        ("orders.placed", None) => {
            let balance = tx
                .get_for_update(&BALANCES, &step.customer)?
                .unwrap_or_else(|| initial_balance(step.customer));
            let hold = if balance >= step.amount {
                tx.put(&BALANCES, &step.customer, &(balance - step.amount))?;
                tx.emit(Event::json(
                    "payments.reserved",
                    step.order.to_string(),
                    &step,
                )?)?;
                Hold::Reserved
            } else {
                let step = Step {
                    reason: Some("insufficient funds".into()),
                    ..step.clone()
                };
                tx.emit(Event::json(
                    "payments.refused",
                    step.order.to_string(),
                    &step,
                )?)?;
                Hold::Refused
            };
            tx.put(
                &RESERVATIONS,
                &step.order,
                &Reservation {
                    customer: step.customer,
                    amount: step.amount,
                    hold,
                },
            )
        }
        ("orders.confirmed", Some(mut r)) if r.hold == Hold::Reserved => {
            r.hold = Hold::Captured;
            tx.emit(Event::json(
                "payments.captured",
                step.order.to_string(),
                &step,
            )?)?;
            tx.put(&RESERVATIONS, &step.order, &r)
        }
        ("orders.cancelled", Some(mut r)) if r.hold == Hold::Reserved => {
            // Compensation: give the money back.
            let balance = tx
                .get_for_update(&BALANCES, &r.customer)?
                .unwrap_or_else(|| initial_balance(r.customer));
            tx.put(&BALANCES, &r.customer, &(balance + r.amount))?;
            r.hold = Hold::Released;
            tx.emit(Event::json(
                "payments.released",
                step.order.to_string(),
                &step,
            )?)?;
            tx.put(&RESERVATIONS, &step.order, &r)
        }
        // Settled already, or a cancellation of a refused payment.
        ("orders.placed" | "orders.confirmed" | "orders.cancelled", _) => Ok(()),
        (other, _) => Err(Error::abort(format!("payments does not handle {other}"))),
    }
}

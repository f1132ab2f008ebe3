//! Full DHCP server (RFC 2131/2132): address pools, reservations and leases, with the
//! PXE boot fields of [`super::proxy`] in the same replies.
//!
//! The lease table lives here, in memory, as the authority. Every change a client can
//! see (an address bound, renewed, released or declined) is queued as a [`LeaseEvent`]
//! that the daemon persists; at start-up the daemon hands the stored leases back with
//! [`Server::restore`]. Offers are held only in memory, for [`Config::offer_secs`].
//!
//! Call order: [`Server::handle`] for each request (with the time as seconds since the
//! Unix epoch), then drain [`Server::poll_event`]; call [`Server::expire`] from time to
//! time to drop stale offers and declines. Nothing here reads a clock, a socket or the
//! store.
//!
//! Addresses are chosen in RFC 2131 §4.3.1's order: the client's reservation, its current
//! or previous address, the address it asks for, then the first free address of the
//! range from a starting point derived from its MAC (so a client tends to get the same
//! address even after its lease was lost, and clients spread over the range).

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use serde::Serialize;

pub use super::Meta;
use super::proxy::{self, Destination, reply_header};
use super::pxe::{Client, Vendor};
use crate::mac::MacAddr;

/// One subnet and the range of it that is handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// Network address.
    pub network: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
    /// First address handed out.
    pub first: Ipv4Addr,
    /// Last address handed out.
    pub last: Ipv4Addr,
    /// Default gateway (option 3).
    pub router: Option<Ipv4Addr>,
    /// DNS servers (option 6).
    pub dns: Vec<Ipv4Addr>,
    /// Domain name (option 15).
    pub domain: Option<String>,
    /// Lease time in seconds.
    pub lease_secs: u32,
    /// The interface whose directly attached clients this pool serves; `None` when the
    /// pool is chosen by address (the interface's own address, or the relay's `giaddr`).
    pub interface: Option<String>,
}

impl Pool {
    /// The netmask.
    pub fn mask(&self) -> Ipv4Addr {
        let bits = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        Ipv4Addr::from(bits)
    }

    /// True when `ip` is in the subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::from(self.mask());
        u32::from(ip) & mask == u32::from(self.network) & mask
    }

    /// The subnet's broadcast address.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !u32::from(self.mask()))
    }

    /// True when `ip` is in the range handed out.
    pub fn in_range(&self, ip: Ipv4Addr) -> bool {
        (u32::from(self.first)..=u32::from(self.last)).contains(&u32::from(ip))
            && ip != self.network
            && ip != self.broadcast()
    }

    fn size(&self) -> u32 {
        u32::from(self.last)
            .saturating_sub(u32::from(self.first))
            .saturating_add(1)
    }
}

/// A fixed address for one MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// The client.
    pub mac: MacAddr,
    /// Its address (inside a pool's subnet, not necessarily inside its range).
    pub ip: Ipv4Addr,
    /// Host name sent to it (option 12).
    pub hostname: Option<String>,
}

/// What the server hands out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The pools.
    pub pools: Vec<Pool>,
    /// The reservations.
    pub reservations: Vec<Reservation>,
    /// How long an offered address is held for the client that was offered it.
    pub offer_secs: u32,
    /// How long a declined address (in use by someone else, RFC 2131 §4.3.3) is held back.
    pub decline_secs: u32,
}

/// The state of a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseState {
    /// Offered, waiting for the client's DHCPREQUEST.
    Offered,
    /// Acknowledged: the client uses the address until `expires`, or released it.
    Bound,
    /// A client declined it: something else answers on this address.
    Declined,
}

impl LeaseState {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Offered => "offered",
            Self::Bound => "bound",
            Self::Declined => "declined",
        }
    }

    /// Parses [`Self::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "offered" => Self::Offered,
            "bound" => Self::Bound,
            "declined" => Self::Declined,
            _ => return None,
        })
    }
}

/// An address and who holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lease {
    /// The address.
    pub ip: Ipv4Addr,
    /// The client holding (or last holding) it.
    pub mac: MacAddr,
    /// End of the lease (seconds since the Unix epoch). A released lease ends when it is
    /// released; the address stays associated with its client until someone else needs it.
    pub expires: u64,
    /// Offered, bound or declined.
    pub state: LeaseState,
    /// The host name the client sent (option 12) or its reservation's.
    pub hostname: Option<String>,
}

impl Lease {
    /// True while the lease keeps the address from other clients.
    pub fn active(&self, now: u64) -> bool {
        now < self.expires
    }
}

/// A change to persist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    /// A lease was bound, renewed, released or declined: store it as it is now.
    Saved(Lease),
    /// The address has no lease any more.
    Removed(Ipv4Addr),
}

/// Why a request got no answer (counted by the driver).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// Not a BOOTREQUEST from an Ethernet client, or no message type.
    NotARequest,
    /// No pool for the interface or the relay the request came through.
    NoPool,
    /// Every address of the pool is taken.
    PoolExhausted,
    /// The client selected another server's offer.
    OtherServer,
    /// A DHCPREQUEST without the address it asks for.
    NoRequestedAddress,
    /// A message type a server does not answer (OFFER, ACK, NAK...).
    MessageType,
}

/// An answer to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The message.
    pub message: Message,
    /// Where it goes.
    pub to: Destination,
    /// The client as its request described it.
    pub client: Client,
    /// The address given (yiaddr), for OFFER and ACK of an address.
    pub ip: Option<Ipv4Addr>,
    /// The PXE boot file, when the client is a PXE or HTTP Boot client.
    pub boot_file: Option<String>,
}

impl Reply {
    /// The message type of the reply.
    pub fn kind(&self) -> Option<MessageType> {
        self.message.opts().msg_type()
    }
}

/// The server: configuration and lease table.
#[derive(Debug)]
pub struct Server {
    config: Config,
    leases: HashMap<Ipv4Addr, Lease>,
    by_mac: HashMap<MacAddr, Ipv4Addr>,
    /// The bound address a client still holds while `by_mac` names an offer it was made
    /// since (on another subnet, say).
    held: HashMap<MacAddr, Ipv4Addr>,
    events: VecDeque<LeaseEvent>,
}

/// iPXE's "no-pxedhcp" setting (option 175.176 = 1): iPXE takes this offer at once
/// instead of waiting about 3 s for proxyDHCP offers that will not come.
const IPXE_NO_PXEDHCP: [u8; 3] = [176, 1, 1];

impl Server {
    /// A server with no leases.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            leases: HashMap::new(),
            by_mac: HashMap::new(),
            held: HashMap::new(),
            events: VecDeque::new(),
        }
    }

    /// Takes back stored leases; those outside every pool are dropped (and a removal is
    /// queued for them).
    pub fn restore(&mut self, leases: impl IntoIterator<Item = Lease>) {
        for l in leases {
            if self.config.pools.iter().any(|p| p.contains(l.ip)) {
                self.put(l);
            } else {
                self.events.push_back(LeaseEvent::Removed(l.ip));
            }
        }
    }

    /// The lease table, in address order.
    pub fn leases(&self) -> Vec<Lease> {
        let mut v: Vec<Lease> = self.leases.values().cloned().collect();
        v.sort_by_key(|l| u32::from(l.ip));
        v
    }

    /// The next change to persist.
    pub fn poll_event(&mut self) -> Option<LeaseEvent> {
        self.events.pop_front()
    }

    /// Leases by state at `now`: (bound and active, offered, declined, bound but ended).
    pub fn counts(&self, now: u64) -> (u64, u64, u64, u64) {
        let mut c = (0, 0, 0, 0);
        for l in self.leases.values() {
            match (l.state, l.active(now)) {
                (LeaseState::Bound, true) => c.0 += 1,
                (LeaseState::Offered, _) => c.1 += 1,
                (LeaseState::Declined, _) => c.2 += 1,
                (LeaseState::Bound, false) => c.3 += 1,
            }
        }
        c
    }

    /// Drops offers nobody took and declines whose hold time is over.
    pub fn expire(&mut self, now: u64) {
        let stale: Vec<Ipv4Addr> = self
            .leases
            .values()
            .filter(|l| l.state != LeaseState::Bound && !l.active(now))
            .map(|l| l.ip)
            .collect();
        for ip in stale {
            if let Some(l) = self.remove(ip)
                && l.state == LeaseState::Declined
            {
                self.events.push_back(LeaseEvent::Removed(ip));
            }
        }
    }

    fn put(&mut self, lease: Lease) {
        let mac = lease.mac;
        let previous = self
            .by_mac
            .get(&mac)
            .copied()
            .filter(|&ip| ip != lease.ip && self.leases.get(&ip).is_some_and(|l| l.mac == mac));
        if lease.state == LeaseState::Bound {
            // A client holds one address: once it is bound to this one, the one it had
            // and one it still held over an offer go back to the pool.
            let held = self.held.remove(&mac).filter(|&ip| ip != lease.ip);
            for ip in previous.into_iter().chain(held) {
                let theirs = self
                    .leases
                    .get(&ip)
                    .is_some_and(|l| l.mac == mac && l.state != LeaseState::Declined);
                if theirs
                    && self
                        .leases
                        .remove(&ip)
                        .is_some_and(|l| l.state == LeaseState::Bound)
                {
                    self.events.push_back(LeaseEvent::Removed(ip));
                }
            }
        } else if let Some(ip) = previous {
            // A new offer replaces an earlier one. An address the client holds stays
            // its own until it is bound to another, releases it or lets it expire: an
            // offer is not an answer, and the client may still be using it.
            match self.leases.get(&ip).map(|l| l.state) {
                Some(LeaseState::Offered) => {
                    self.leases.remove(&ip);
                }
                Some(LeaseState::Bound) => {
                    self.held.insert(mac, ip);
                }
                _ => {}
            }
        }
        if let Some(prev) = self.leases.get(&lease.ip)
            && prev.mac != lease.mac
            && self.by_mac.get(&prev.mac) == Some(&lease.ip)
        {
            self.by_mac.remove(&prev.mac);
        }
        if lease.state != LeaseState::Declined {
            self.by_mac.insert(lease.mac, lease.ip);
        }
        self.leases.insert(lease.ip, lease);
    }

    fn remove(&mut self, ip: Ipv4Addr) -> Option<Lease> {
        let l = self.leases.remove(&ip)?;
        if self.by_mac.get(&l.mac) == Some(&ip) {
            self.by_mac.remove(&l.mac);
        }
        Some(l)
    }

    fn pool_for(&self, req: &Message, meta: &Meta<'_>) -> Option<&Pool> {
        let giaddr = req.giaddr();
        let pools = &self.config.pools;
        if !giaddr.is_unspecified() {
            return pools.iter().find(|p| p.contains(giaddr));
        }
        pools
            .iter()
            .find(|p| p.interface.as_deref() == Some(meta.iface))
            .or_else(|| {
                let server = meta.server();
                pools
                    .iter()
                    .find(|p| p.interface.is_none() && p.contains(server))
            })
    }

    fn reservation(&self, mac: MacAddr) -> Option<&Reservation> {
        self.config.reservations.iter().find(|r| r.mac == mac)
    }

    /// True when `mac` may be given `ip` now.
    fn available(
        &self,
        pool: &Pool,
        ip: Ipv4Addr,
        mac: MacAddr,
        now: u64,
        server: Ipv4Addr,
    ) -> bool {
        if !pool.contains(ip) || ip == server || ip == pool.network || ip == pool.broadcast() {
            return false;
        }
        if self
            .config
            .reservations
            .iter()
            .any(|r| r.ip == ip && r.mac != mac)
        {
            return false;
        }
        if pool.router == Some(ip) || pool.dns.contains(&ip) {
            return false;
        }
        match self.leases.get(&ip) {
            None => true,
            Some(l) if l.state == LeaseState::Declined => !l.active(now),
            Some(l) => l.mac == mac || !l.active(now),
        }
    }

    /// The address to offer `mac`, in RFC 2131 §4.3.1's order.
    fn choose(
        &self,
        pool: &Pool,
        mac: MacAddr,
        requested: Option<Ipv4Addr>,
        now: u64,
        server: Ipv4Addr,
    ) -> Option<Ipv4Addr> {
        if let Some(r) = self.reservation(mac)
            && pool.contains(r.ip)
        {
            return self.available(pool, r.ip, mac, now, server).then_some(r.ip);
        }
        let ok = |ip: Ipv4Addr| pool.in_range(ip) && self.available(pool, ip, mac, now, server);
        if let Some(&ip) = self.by_mac.get(&mac)
            && ok(ip)
        {
            return Some(ip);
        }
        if let Some(ip) = requested
            && ok(ip)
        {
            return Some(ip);
        }
        let size = pool.size();
        if size == 0 {
            return None;
        }
        let (first, size) = (u64::from(u32::from(pool.first)), u64::from(size));
        let start = u64::from(mac_hash(mac)) % size;
        // Offsets stay below `size`, so `first + offset <= last` fits in 32 bits.
        let nth = |i: u64| Ipv4Addr::from(u32::try_from(first + (start + i) % size).unwrap_or(0));
        (0..size)
            .map(nth)
            .find(|&ip| ok(ip) && !self.leases.contains_key(&ip))
            // Nothing never used is left: take an expired lease of another client.
            .or_else(|| (0..size).map(nth).find(|&ip| ok(ip)))
    }

    /// Decides the answer to `req`; `Ok(None)` for a DHCPRELEASE or DHCPDECLINE, which
    /// get none. `pxe` gives the boot server and files for PXE clients.
    pub fn handle(
        &mut self,
        now: u64,
        req: &Message,
        meta: &Meta<'_>,
        pxe: &proxy::Context,
    ) -> Result<Option<Reply>, Ignored> {
        if req.opcode() != Opcode::BootRequest {
            return Err(Ignored::NotARequest);
        }
        let client = Client::from_message(req).ok_or(Ignored::NotARequest)?;
        let kind = req.opts().msg_type().ok_or(Ignored::NotARequest)?;
        let requested = match req.opts().get(OptionCode::RequestedIpAddress) {
            Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
            _ => None,
        };
        let hostname = match req.opts().get(OptionCode::Hostname) {
            Some(DhcpOption::Hostname(h)) => Some(safe_hostname(h)).filter(|h| !h.is_empty()),
            _ => None,
        };
        let mac = client.mac;
        match kind {
            MessageType::Discover => {
                let pool = self.pool_for(req, meta).ok_or(Ignored::NoPool)?.clone();
                let ip = self
                    .choose(&pool, mac, requested, now, meta.server())
                    .ok_or(Ignored::PoolExhausted)?;
                let hostname = self.hostname_for(mac, hostname);
                let current = self
                    .leases
                    .get(&ip)
                    .filter(|l| l.mac == mac && l.state == LeaseState::Bound && l.active(now))
                    .cloned();
                // An offer never shortens a lease the client already holds.
                let lease = current.unwrap_or(Lease {
                    ip,
                    mac,
                    expires: now + u64::from(self.config.offer_secs),
                    state: LeaseState::Offered,
                    hostname: hostname.clone(),
                });
                self.put(lease);
                Ok(Some(self.answer(
                    req,
                    client,
                    MessageType::Offer,
                    Some(ip),
                    &pool,
                    meta,
                    pxe,
                    hostname,
                )))
            }
            MessageType::Request => self.request(now, req, client, requested, hostname, meta, pxe),
            MessageType::Decline => {
                if let Some(ip) = requested
                    && self.leases.get(&ip).is_some_and(|l| l.mac == mac)
                {
                    let held = Lease {
                        ip,
                        mac,
                        expires: now + u64::from(self.config.decline_secs),
                        state: LeaseState::Declined,
                        hostname: None,
                    };
                    self.remove(ip);
                    self.put(held.clone());
                    self.events.push_back(LeaseEvent::Saved(held));
                }
                Ok(None)
            }
            MessageType::Release => {
                let ip = req.ciaddr();
                if let Some(l) = self.leases.get_mut(&ip)
                    && l.mac == mac
                    && l.state == LeaseState::Bound
                {
                    l.expires = l.expires.min(now);
                    let saved = l.clone();
                    self.events.push_back(LeaseEvent::Saved(saved));
                }
                Ok(None)
            }
            MessageType::Inform => {
                let pool = self.pool_for(req, meta).ok_or(Ignored::NoPool)?.clone();
                let hostname = self.hostname_for(mac, None);
                Ok(Some(self.answer(
                    req,
                    client,
                    MessageType::Ack,
                    None,
                    &pool,
                    meta,
                    pxe,
                    hostname,
                )))
            }
            _ => Err(Ignored::MessageType),
        }
    }

    fn hostname_for(&self, mac: MacAddr, sent: Option<String>) -> Option<String> {
        self.reservation(mac)
            .and_then(|r| r.hostname.clone())
            .or(sent)
    }

    /// DHCPREQUEST in its three forms (RFC 2131 §4.3.2).
    #[allow(
        clippy::too_many_arguments,
        reason = "one request's facts, passed once"
    )]
    fn request(
        &mut self,
        now: u64,
        req: &Message,
        client: Client,
        requested: Option<Ipv4Addr>,
        hostname: Option<String>,
        meta: &Meta<'_>,
        pxe: &proxy::Context,
    ) -> Result<Option<Reply>, Ignored> {
        let mac = client.mac;
        let server_id = match req.opts().get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
            _ => None,
        };
        let ciaddr = req.ciaddr();
        let Some(pool) = self.pool_for(req, meta).cloned() else {
            return Err(Ignored::NoPool);
        };
        let ip = match server_id {
            // SELECTING: the answer to an offer, ours or another server's.
            Some(sid) => {
                if sid != meta.server() {
                    if let Some(&ip) = self.by_mac.get(&mac)
                        && self
                            .leases
                            .get(&ip)
                            .is_some_and(|l| l.state == LeaseState::Offered)
                    {
                        self.remove(ip);
                    }
                    return Err(Ignored::OtherServer);
                }
                let ip = requested.unwrap_or(ciaddr);
                let ours = self
                    .leases
                    .get(&ip)
                    .is_some_and(|l| l.mac == mac && l.state != LeaseState::Declined);
                if !ours {
                    return Ok(Some(self.nak(
                        req,
                        client,
                        meta,
                        "address not offered to this client",
                    )));
                }
                ip
            }
            // INIT-REBOOT (requested, no ciaddr) or RENEWING/REBINDING (ciaddr).
            None => {
                let ip = if ciaddr.is_unspecified() {
                    requested.ok_or(Ignored::NoRequestedAddress)?
                } else {
                    ciaddr
                };
                if !pool.contains(ip) {
                    return Ok(Some(self.nak(req, client, meta, "wrong network")));
                }
                let reserved_elsewhere = self
                    .reservation(mac)
                    .is_some_and(|r| pool.contains(r.ip) && r.ip != ip);
                let usable = (pool.in_range(ip)
                    || self.reservation(mac).is_some_and(|r| r.ip == ip))
                    && self.available(&pool, ip, mac, now, meta.server());
                if reserved_elsewhere || !usable {
                    return Ok(Some(self.nak(req, client, meta, "address not available")));
                }
                ip
            }
        };
        let hostname = self.hostname_for(mac, hostname);
        let lease = Lease {
            ip,
            mac,
            expires: now + u64::from(pool.lease_secs),
            state: LeaseState::Bound,
            hostname: hostname.clone(),
        };
        self.put(lease.clone());
        self.events.push_back(LeaseEvent::Saved(lease));
        Ok(Some(self.answer(
            req,
            client,
            MessageType::Ack,
            Some(ip),
            &pool,
            meta,
            pxe,
            hostname,
        )))
    }

    fn nak(&self, req: &Message, client: Client, meta: &Meta<'_>, why: &str) -> Reply {
        let mut m = reply_header(req);
        let giaddr = req.giaddr();
        // A NAK is broadcast: the client may not be able to use the address it has.
        m.set_flags(Flags::default().set_broadcast());
        let o = m.opts_mut();
        o.insert(DhcpOption::MessageType(MessageType::Nak));
        o.insert(DhcpOption::ServerIdentifier(meta.server()));
        o.insert(DhcpOption::Message(why.to_owned()));
        echo_relay_info(req, &mut m);
        Reply {
            message: m,
            to: if giaddr.is_unspecified() {
                Destination::Broadcast
            } else {
                Destination::Relay(giaddr)
            },
            client,
            ip: None,
            boot_file: None,
        }
    }

    /// An OFFER or ACK: the address (`ip`, none for DHCPINFORM), the pool's options and,
    /// for PXE clients, the boot server and file.
    #[allow(clippy::too_many_arguments, reason = "one reply's facts, passed once")]
    fn answer(
        &self,
        req: &Message,
        client: Client,
        kind: MessageType,
        ip: Option<Ipv4Addr>,
        pool: &Pool,
        meta: &Meta<'_>,
        pxe: &proxy::Context,
        hostname: Option<String>,
    ) -> Reply {
        let server = meta.server();
        let mut m = reply_header(req);
        m.set_ciaddr(req.ciaddr());
        if let Some(ip) = ip {
            m.set_yiaddr(ip);
        }
        let o = m.opts_mut();
        o.insert(DhcpOption::MessageType(kind));
        o.insert(DhcpOption::ServerIdentifier(server));
        if ip.is_some() {
            o.insert(DhcpOption::AddressLeaseTime(pool.lease_secs));
            o.insert(DhcpOption::Renewal(pool.lease_secs / 2));
            o.insert(DhcpOption::Rebinding(pool.lease_secs / 8 * 7));
        }
        o.insert(DhcpOption::SubnetMask(pool.mask()));
        o.insert(DhcpOption::BroadcastAddr(pool.broadcast()));
        if let Some(r) = pool.router {
            o.insert(DhcpOption::Router(vec![r]));
        }
        if !pool.dns.is_empty() {
            o.insert(DhcpOption::DomainNameServer(pool.dns.clone()));
        }
        if let Some(d) = &pool.domain {
            o.insert(DhcpOption::DomainName(d.clone()));
        }
        if let Some(h) = hostname {
            o.insert(DhcpOption::Hostname(h));
        }
        let pi = client.is_raspberry_pi();
        let boot_file = if (client.vendor.is_some() || client.ipxe) && !pi {
            proxy::boot_file(&client, pxe, server)
        } else {
            None
        };
        if pi {
            // The Pi's loader needs the PXE vendor options and the TFTP server, no file.
            m.set_siaddr(server);
            let o = m.opts_mut();
            o.insert(DhcpOption::ClassIdentifier(b"PXEClient".to_vec()));
            o.insert(DhcpOption::TFTPServerName(server.to_string().into_bytes()));
            o.insert(DhcpOption::VendorExtensions(
                super::pxe::RASPBERRY_PI_OPTION_43.to_vec(),
            ));
        }
        if let Some(file) = &boot_file {
            m.set_siaddr(server).set_fname_str(file);
            let o = m.opts_mut();
            o.insert(DhcpOption::BootfileName(file.clone().into_bytes()));
            match client.vendor {
                Some(Vendor::Pxe) => {
                    o.insert(DhcpOption::ClassIdentifier(b"PXEClient".to_vec()));
                    o.insert(DhcpOption::TFTPServerName(server.to_string().into_bytes()));
                }
                Some(Vendor::Http) => {
                    o.insert(DhcpOption::ClassIdentifier(b"HTTPClient".to_vec()));
                }
                None => {}
            }
            if let Some(uuid) = &client.uuid {
                o.insert(DhcpOption::ClientMachineIdentifier(uuid.clone()));
            }
        }
        if client.ipxe {
            m.opts_mut()
                .insert(DhcpOption::Unknown(dhcproto::v4::UnknownOption::new(
                    OptionCode::Unknown(175),
                    IPXE_NO_PXEDHCP.to_vec(),
                )));
        }
        echo_relay_info(req, &mut m);
        let giaddr = req.giaddr();
        let to = if !giaddr.is_unspecified() {
            Destination::Relay(giaddr)
        } else if !req.ciaddr().is_unspecified() && meta.has_source() {
            Destination::Source
        } else {
            m.set_flags(Flags::default().set_broadcast());
            Destination::Broadcast
        };
        Reply {
            message: m,
            to,
            client,
            ip,
            boot_file,
        }
    }
}

/// RFC 3046 §2.2: a server echoes the relay agent information option unchanged.
fn echo_relay_info(req: &Message, m: &mut Message) {
    if let Some(opt) = req.opts().get(OptionCode::RelayAgentInformation) {
        m.opts_mut().insert(opt.clone());
    }
}

/// A host name as a client may send it back in option 12: letters, digits, `-` and `.`,
/// at most 63 characters.
fn safe_hostname(h: &str) -> String {
    h.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .take(63)
        .collect()
}

/// FNV-1a over the MAC: where a client's search for a free address starts.
fn mac_hash(mac: MacAddr) -> u32 {
    mac.0.iter().fold(0x811c_9dc5_u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests;

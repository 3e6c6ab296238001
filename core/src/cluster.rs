//! Redis Cluster: which hash slot a key lives in, and the event streams named per slot.
//!
//! A Redis Cluster runs a script only when every key it names hashes to one slot (CRC16 of
//! the key's `{hash tag}`, modulo 16384; `CROSSSLOT` otherwise). Every key of a user carries
//! the user's tag, so a reservation or a report is one slot already; a settlement batch of
//! many users is split by slot (`settlement_queue`), and its usage events go to a stream in
//! the same slot: one stream per slot, `<events_stream>:<slot>:{<tag>}`, where `<tag>` is the
//! smallest number whose decimal digits hash to that slot. At most 16384 streams whatever the
//! number of users, each named by this rule, so a reader can list them without scanning.

use std::sync::OnceLock;

use crate::config::RedisSettings;

/// Hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// CRC16-CCITT (XMODEM: polynomial 0x1021, initial value 0), as Redis Cluster hashes keys.
const CRC16_TABLE: [u16; 256] = crc16_table();

// Evaluated at compile time: an index out of bounds would fail the build, never the .wasm.
#[allow(clippy::indexing_slicing)]
const fn crc16_table() -> [u16; 256] {
    let mut table = [0u16; 256];
    let mut byte = 0;
    while byte < 256 {
        let mut crc = (byte as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[byte] = crc;
        byte += 1;
    }
    table
}

/// CRC16/XMODEM of `bytes`.
pub fn crc16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0u16, |crc, &b| {
        let index = usize::from((crc >> 8) as u8 ^ b);
        (crc << 8) ^ CRC16_TABLE.get(index).copied().unwrap_or(0)
    })
}

/// What Redis hashes of `key`: what lies between its first `{` and the first `}` after it,
/// if that is not empty; else the whole key.
fn hash_tag(key: &[u8]) -> &[u8] {
    let Some(open) = key.iter().position(|&b| b == b'{') else {
        return key;
    };
    let after = key.get(open + 1..).unwrap_or_default();
    match after.iter().position(|&b| b == b'}') {
        Some(close) if close > 0 => after.get(..close).unwrap_or(key),
        _ => key,
    }
}

/// The hash slot of `key` (`CLUSTER KEYSLOT`).
pub fn key_slot(key: &[u8]) -> u16 {
    crc16(hash_tag(key)) % SLOTS
}

/// The tag of `slot`'s event stream: the smallest number whose decimal digits hash to it.
pub fn slot_tag(slot: u16) -> u32 {
    slot_tags()
        .get(usize::from(slot % SLOTS))
        .copied()
        .unwrap_or(0)
}

/// Every slot's tag, found once: the largest is 109757, so about 110,000 short numbers are
/// hashed (about a millisecond natively), on the first flush of a worker on a cluster.
fn slot_tags() -> &'static [u32] {
    static TAGS: OnceLock<Vec<u32>> = OnceLock::new();
    TAGS.get_or_init(|| {
        let mut tags = vec![u32::MAX; usize::from(SLOTS)];
        let mut missing = usize::from(SLOTS);
        let mut digits = [0u8; 10];
        for n in 0..u32::MAX {
            if missing == 0 {
                break;
            }
            let slot = crc16(decimal(n, &mut digits)) % SLOTS;
            match tags.get_mut(usize::from(slot)) {
                Some(tag) if *tag == u32::MAX => {
                    *tag = n;
                    missing -= 1;
                }
                _ => {}
            }
        }
        tags
    })
}

/// `n` in decimal, written into `buffer`.
fn decimal(mut n: u32, buffer: &mut [u8; 10]) -> &[u8] {
    let mut start = buffer.len();
    loop {
        start -= 1;
        if let Some(digit) = buffer.get_mut(start) {
            *digit = b'0' + (n % 10) as u8;
        }
        n /= 10;
        if n == 0 || start == 0 {
            break;
        }
    }
    buffer.get(start..).unwrap_or_default()
}

/// `slot`'s event stream: `<base>:<slot>:{<tag>}`.
pub fn slot_events_stream(base: &str, slot: u16) -> String {
    format!("{base}:{slot}:{{{}}}", slot_tag(slot))
}

/// Every slot's event stream, slot by slot.
pub fn all_events_streams(base: &str) -> impl Iterator<Item = String> + '_ {
    (0..SLOTS).map(move |slot| slot_events_stream(base, slot))
}

/// Where the events of the user owning `user_key` (any of its keys) go: the one stream on a
/// single Redis, the stream of the user's slot on a cluster.
pub fn events_stream_of(redis: &RedisSettings, user_key: &str) -> String {
    if redis.cluster_mode {
        slot_events_stream(&redis.events_stream, key_slot(user_key.as_bytes()))
    } else {
        redis.events_stream.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_is_xmodem() {
        // The CRC catalogue's check value of CRC-16/XMODEM.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(crc16(b""), 0);
    }

    #[test]
    fn slots_are_those_redis_cluster_computes() {
        // `redis-cli CLUSTER KEYSLOT <key>` on Redis 7.0.15.
        for (key, slot) in [
            ("foo", 12182),
            ("bar", 5061),
            ("123456789", 12739),
            ("", 0),
            ("{user1000}.following", 3443),
            ("{u1}", 4574),
            ("plan-limits:{alice}:2026-11", 749),
            // An empty tag, an unclosed one, and only the first one count.
            ("a{}b", 13694),
            ("{}", 15257),
            ("a{b", 13340),
            ("a{b}{c}", 3300),
        ] {
            assert_eq!(key_slot(key.as_bytes()), slot, "{key:?}");
        }
    }

    #[test]
    fn a_users_keys_share_a_slot() {
        let keys = crate::keys::UsageKeys::new("plan-limits", "alice", "2026-11", "upload");
        let slot = key_slot(keys.summary.as_bytes());
        for key in [
            &keys.pending,
            &keys.commits,
            &keys.entitlement,
            &keys.user.day("2026-11-29"),
        ] {
            assert_eq!(key_slot(key.as_bytes()), slot, "{key}");
        }
        assert_eq!(slot, 749);
    }

    #[test]
    fn every_slot_has_a_stream_in_that_slot() {
        let mut largest = 0;
        for slot in 0..SLOTS {
            let stream = slot_events_stream("plan-limits:events", slot);
            assert_eq!(key_slot(stream.as_bytes()), slot, "{stream}");
            largest = largest.max(slot_tag(slot));
        }
        assert!(largest < 1_000_000, "tags stay short: {largest}");
        assert_eq!(slot_tag(0), slot_tags()[0]);
        assert_eq!(all_events_streams("e").count(), usize::from(SLOTS));
    }

    #[test]
    fn events_go_to_the_users_slot_on_a_cluster_only() {
        let single = RedisSettings::default();
        let key = "plan-limits:{alice}:entitlement";
        assert_eq!(events_stream_of(&single, key), "plan-limits:events");
        let cluster = RedisSettings {
            cluster_mode: true,
            ..RedisSettings::default()
        };
        let stream = events_stream_of(&cluster, key);
        assert!(stream.starts_with("plan-limits:events:749:{"), "{stream}");
        assert_eq!(key_slot(stream.as_bytes()), 749);
    }

    #[test]
    fn decimals_are_written_as_digits() {
        let mut buffer = [0u8; 10];
        assert_eq!(decimal(0, &mut buffer), b"0");
        assert_eq!(decimal(4_294_967_295, &mut buffer), b"4294967295");
        assert_eq!(decimal(1207, &mut buffer), b"1207");
    }

    proptest::proptest! {
        #[test]
        fn a_tag_decides_the_slot(tag in "[^{}]{1,12}", before in "[^{]{0,8}", after in ".{0,8}") {
            let key = format!("{before}{{{tag}}}{after}");
            proptest::prop_assert_eq!(key_slot(key.as_bytes()), key_slot(tag.as_bytes()));
        }
    }
}

//! Addresses that guests, plans and hosts exchange, parsed and checked in one place: a PCI
//! function's [`Bdf`] and a NIC's [`MacAddr`]. Both print in the canonical lower-case form
//! the protocol carries (`0000:3b:00.1`, `52:54:00:12:34:56`).

use crate::error::{Error, Result};
use std::fmt;
use std::str::FromStr;

/// A PCI address: domain, bus, device, function (`DDDD:BB:DD.F`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bdf {
    /// PCI domain (segment).
    pub domain: u16,
    /// Bus.
    pub bus: u8,
    /// Device (0..32).
    pub device: u8,
    /// Function (0..8).
    pub function: u8,
}

impl FromStr for Bdf {
    type Err = Error;

    /// `DDDD:BB:DD.F`, or `BB:DD.F` in domain 0; hex, either case.
    fn from_str(s: &str) -> Result<Bdf> {
        let bad = |why: &str| {
            Error::Invalid(format!(
                "PCI address {s:?}: {why} (want DDDD:BB:DD.F, e.g. 0000:3b:00.1)"
            ))
        };
        let hex = |part: &str, digits: usize, what: &str| -> Result<u32> {
            if part.len() != digits || !part.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad(&format!("{what} must be {digits} hex digits")));
            }
            u32::from_str_radix(part, 16).map_err(|_| bad(what))
        };
        let (rest, function) = s.rsplit_once('.').ok_or_else(|| bad("no function"))?;
        let parts: Vec<&str> = rest.split(':').collect();
        let (domain, bus, device) = match parts.as_slice() {
            [d, b, dev] => (hex(d, 4, "domain")?, *b, *dev),
            [b, dev] => (0, *b, *dev),
            _ => return Err(bad("wrong number of ':'")),
        };
        let bus = hex(bus, 2, "bus")?;
        let device = hex(device, 2, "device")?;
        let function = hex(function, 1, "function")?;
        if device >= 32 {
            return Err(bad("device must be below 0x20"));
        }
        if function >= 8 {
            return Err(bad("function must be below 8"));
        }
        Ok(Bdf {
            domain: domain as u16,
            bus: bus as u8,
            device: device as u8,
            function: function as u8,
        })
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

/// A MAC address (`xx:xx:xx:xx:xx:xx`, hex, either case when parsed; lower case printed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = Error;

    fn from_str(s: &str) -> Result<MacAddr> {
        let bad = || Error::Invalid(format!("MAC address {s:?}: want xx:xx:xx:xx:xx:xx"));
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut bytes {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 || !part.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *b = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(bytes))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// Whether `s` is a PCI address in the protocol's form: `DDDD:BB:DD.F`, lower case.
pub fn is_pci_address(s: &str) -> bool {
    s.parse::<Bdf>().is_ok_and(|b| b.to_string() == s)
}

/// Whether `s` is a MAC address in the protocol's form: `xx:xx:xx:xx:xx:xx`, lower case.
pub fn is_mac_address(s: &str) -> bool {
    s.parse::<MacAddr>().is_ok_and(|m| m.to_string() == s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses_parse_print_and_refuse_clearly() {
        let b: Bdf = "0000:3b:00.1".parse().unwrap();
        assert_eq!(
            b,
            Bdf {
                domain: 0,
                bus: 0x3b,
                device: 0,
                function: 1
            }
        );
        assert_eq!(b.to_string(), "0000:3b:00.1");
        assert_eq!(
            "3B:1f.7".parse::<Bdf>().unwrap().to_string(),
            "0000:3b:1f.7"
        );
        assert_eq!("ffff:ff:1f.7".parse::<Bdf>().unwrap().domain, 0xffff);
        for bad in [
            "",
            "3b:00",
            "0000:3b:00.8",
            "0000:3b:20.0",
            "0000:3b:0.1",
            "00000:3b:00.1",
            "0000:3g:00.1",
            "0000:3b:00.1.2",
            "a:b:c:d.1",
            "0000:3b:00.+1",
        ] {
            let e = bad.parse::<Bdf>().unwrap_err().to_string();
            assert!(e.contains("DDDD:BB:DD.F"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn mac_addresses_parse_print_and_refuse_clearly() {
        let m: MacAddr = "52:54:00:AB:cd:0f".parse().unwrap();
        assert_eq!(m, MacAddr([0x52, 0x54, 0, 0xab, 0xcd, 0x0f]));
        assert_eq!(m.to_string(), "52:54:00:ab:cd:0f");
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:11",
            "52-54-00-ab-cd-0f",
            "5:54:00:ab:cd:0ff",
            "52:54:00:ab:cd:+f",
        ] {
            let e = bad.parse::<MacAddr>().unwrap_err().to_string();
            assert!(e.contains("xx:xx:xx:xx:xx:xx"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn the_protocol_form_is_the_canonical_one() {
        assert!(is_pci_address("0000:3b:00.1"));
        for not in ["0000:3B:00.1", "3b:00.1", "0000:3b:20.1", "0000:3b:00.8"] {
            assert!(!is_pci_address(not), "{not}");
        }
        assert!(is_mac_address("52:54:00:ab:cd:0f"));
        assert!(!is_mac_address("52:54:00:AB:cd:0f"));
    }
}

//! libvirt's side of a plan's devices: the device XML a libvirt domain gets for each
//! [`Device`], and what the controller reads in a domain's XML (a device by its alias, the
//! passthrough devices that would keep libvirt from migrating it).
//!
//! A plan device `id` is the libvirt user alias `ua-ID` (libvirt only keeps aliases that start
//! with `ua-`), so the controller finds what it plugged, and what the site plugged under that
//! alias, in the live XML. Compiled without the `libvirt` feature too: `plan check` uses it.

use crate::cluster::Device;
use serde_json::Value;
use std::path::Path;

/// The libvirt alias of a plan device id.
pub fn alias(id: &str) -> String {
    if id.starts_with("ua-") {
        id.to_owned()
    } else {
        format!("ua-{id}")
    }
}

/// Escapes text for an XML attribute in single quotes.
fn attr(value: &str) -> String {
    value
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// The XML that plugs `device` into a libvirt domain (no `<address>`: libvirt picks a free
/// slot). `Err` says why the device cannot be a libvirt one.
pub fn device_xml(device: &Device) -> Result<String, String> {
    let alias = attr(&alias(device.id()));
    let no_properties = |properties: &serde_json::Map<String, Value>| {
        if properties.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{}: properties are QEMU device options; a libvirt domain's device is XML",
                device.id()
            ))
        }
    };
    match device {
        Device::VfioPci {
            host, properties, ..
        } => {
            no_properties(properties)?;
            let b: symvirt_proto::addr::Bdf =
                host.parse().map_err(|e| format!("host {host:?}: {e}"))?;
            Ok(format!(
                "<hostdev mode='subsystem' type='pci' managed='yes'><source>\
                 <address domain='{:#06x}' bus='{:#04x}' slot='{:#04x}' function='{:#x}'/>\
                 </source><alias name='{alias}'/></hostdev>",
                b.domain, b.bus, b.device, b.function
            ))
        }
        Device::HcaStandin {
            mem_path,
            size,
            properties,
            ..
        } => {
            no_properties(properties)?;
            let name = shmem_name(mem_path)?;
            Ok(format!(
                "<shmem name='{}'><model type='ivshmem-plain'/><size unit='bytes'>{size}</size>\
                 <alias name='{alias}'/></shmem>",
                attr(name)
            ))
        }
        Device::VirtioNet {
            mac,
            netdev,
            properties,
            ..
        } => {
            no_properties(properties)?;
            let backend = match netdev {
                None => "type='user'>".to_owned(),
                Some(n) => {
                    let get = |k: &str| n.get(k).and_then(Value::as_str);
                    match (get("type"), get("bridge"), get("network")) {
                        (Some("user"), None, None) => "type='user'>".to_owned(),
                        (Some("bridge"), Some(b), None) => {
                            format!("type='bridge'><source bridge='{}'/>", attr(b))
                        }
                        (Some("network"), None, Some(net)) => {
                            format!("type='network'><source network='{}'/>", attr(net))
                        }
                        _ => {
                            return Err(format!(
                                "{}: a libvirt NIC's netdev is {{type=\"user\"}}, \
                                 {{type=\"bridge\", bridge=NAME}} or {{type=\"network\", network=NAME}}",
                                device.id()
                            ));
                        }
                    }
                }
            };
            Ok(format!(
                "<interface {backend}<mac address='{}'/><model type='virtio'/>\
                 <alias name='{alias}'/></interface>",
                attr(mac)
            ))
        }
        Device::StandbyNic { id, .. } => Err(format!(
            "{id}: a standby NIC is in the domain from boot, not plugged (see with_link)"
        )),
    }
}

/// Checks what libvirt cannot express in `device` (a standby NIC, which is never plugged, is
/// fine): `plan check` runs it on every device of a libvirt VM.
pub fn check_device(device: &Device) -> Result<(), String> {
    if device.is_standby() {
        return Ok(());
    }
    device_xml(device).map(drop)
}

/// The `<interface>` element `element` with its link `up` or down (`<link state=.../>`),
/// for `virDomainUpdateDeviceFlags`: how a standby NIC is switched.
pub fn with_link(element: &str, up: bool) -> Result<String, String> {
    let doc = roxmltree::Document::parse(element).map_err(|e| format!("device XML: {e}"))?;
    let root = doc.root_element();
    if !root.has_tag_name("interface") {
        return Err(format!("<{}> is not a NIC", root.tag_name().name()));
    }
    let state = if up { "up" } else { "down" };
    let link = format!("<link state='{state}'/>");
    if let Some(old) = root.children().find(|c| c.has_tag_name("link")) {
        let r = old.range();
        return Ok(format!(
            "{}{link}{}",
            &element[..r.start],
            &element[r.end..]
        ));
    }
    // Before the closing tag.
    let end = element
        .rfind("</interface>")
        .ok_or("an <interface> without its end tag")?;
    Ok(format!("{}{link}{}", &element[..end], &element[end..]))
}

/// The MAC address of an `<interface>` element, lower-case.
pub fn mac_of(element: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(element).ok()?;
    let mac = doc
        .root_element()
        .children()
        .find(|c| c.has_tag_name("mac"))?;
    mac.attribute("address").map(str::to_ascii_lowercase)
}

/// libvirt backs an ivshmem device with `/dev/shm/NAME`: the stand-in's file must be there.
fn shmem_name(mem_path: &Path) -> Result<&str, String> {
    match (
        mem_path.parent(),
        mem_path.file_name().and_then(|n| n.to_str()),
    ) {
        (Some(dir), Some(name)) if dir == Path::new("/dev/shm") && !name.is_empty() => Ok(name),
        _ => Err(format!(
            "mem_path {}: libvirt backs ivshmem with /dev/shm/NAME",
            mem_path.display()
        )),
    }
}

fn parse(xml: &str) -> Result<roxmltree::Document<'_>, String> {
    roxmltree::Document::parse(xml).map_err(|e| format!("domain XML: {e}"))
}

fn devices<'a, 'i>(
    doc: &'a roxmltree::Document<'i>,
) -> impl Iterator<Item = roxmltree::Node<'a, 'i>> {
    doc.root_element()
        .children()
        .filter(|n| n.has_tag_name("devices"))
        .flat_map(|d| d.children().filter(roxmltree::Node::is_element))
}

fn alias_of<'a>(node: roxmltree::Node<'a, '_>) -> Option<&'a str> {
    node.children()
        .find(|c| c.has_tag_name("alias"))
        .and_then(|a| a.attribute("name"))
}

/// The XML element of the device whose alias is `alias` in a domain's XML, as libvirt wrote
/// it (with its address: given back to `detach` or to a re-attach at the same slot).
pub fn find_device(domain_xml: &str, alias: &str) -> Result<Option<String>, String> {
    let doc = parse(domain_xml)?;
    Ok(devices(&doc)
        .find(|n| alias_of(*n) == Some(alias))
        .map(|n| domain_xml[n.range()].to_owned()))
}

/// The devices of a domain that keep libvirt (and QEMU) from migrating it: host devices and
/// ivshmem regions, other than those the plan detaches first (`detached`: plan device ids).
pub fn blocking_devices(domain_xml: &str, detached: &[&str]) -> Result<Vec<String>, String> {
    let doc = parse(domain_xml)?;
    let detached: Vec<String> = detached.iter().map(|id| alias(id)).collect();
    Ok(devices(&doc)
        .filter(|n| n.has_tag_name("hostdev") || n.has_tag_name("shmem"))
        .filter(|n| alias_of(*n).is_none_or(|a| !detached.iter().any(|d| d == a)))
        .map(|n| {
            let what = n.tag_name().name();
            match (alias_of(n), n.attribute("name")) {
                (Some(a), _) => format!("{what} {a}"),
                (None, Some(name)) => format!("{what} {name}"),
                (None, None) => what.to_owned(),
            }
        })
        .collect())
}

/// A domain's XML without the devices aliased `aliases` (a persistent definition that moves
/// without the passthrough devices the plan detaches).
pub fn without_devices(domain_xml: &str, aliases: &[String]) -> Result<String, String> {
    let doc = parse(domain_xml)?;
    let mut ranges: Vec<std::ops::Range<usize>> = devices(&doc)
        .filter(|n| alias_of(*n).is_some_and(|a| aliases.iter().any(|x| x == a)))
        .map(|n| n.range())
        .collect();
    ranges.sort_by_key(|r| r.start);
    let mut out = String::with_capacity(domain_xml.len());
    let mut at = 0;
    for r in ranges {
        out.push_str(&domain_xml[at..r.start]);
        at = r.end;
    }
    out.push_str(&domain_xml[at..]);
    Ok(out)
}

/// `element` without its `<address .../>` child: the device is plugged where the domain has
/// room (at a destination, the source's slot may be taken).
pub fn without_address(element: &str) -> Result<String, String> {
    let doc = roxmltree::Document::parse(element).map_err(|e| format!("device XML: {e}"))?;
    let Some(address) = doc
        .root_element()
        .children()
        .find(|c| c.has_tag_name("address"))
    else {
        return Ok(element.to_owned());
    };
    let range = address.range();
    Ok(format!(
        "{}{}",
        &element[..range.start],
        &element[range.end..]
    ))
}

/// A PCI address's bus and slot.
pub type PciSlot = (u32, u32);

fn hex_attr(node: roxmltree::Node<'_, '_>, name: &str) -> Option<u32> {
    let v = node.attribute(name)?;
    u32::from_str_radix(v.trim_start_matches("0x"), 16).ok()
}

/// The guest-side PCI bus and slot of a device element (its `<address type='pci'>` child).
pub fn pci_slot(element: &str) -> Option<PciSlot> {
    let doc = roxmltree::Document::parse(element).ok()?;
    let address = doc
        .root_element()
        .children()
        .find(|c| c.has_tag_name("address") && c.attribute("type") == Some("pci"))?;
    Some((hex_attr(address, "bus")?, hex_attr(address, "slot")?))
}

/// A slot of the root bus for a hot-plug into a domain on a `pci-root` bus (an i440fx
/// machine, ACPI hot-plug): the lowest slot no device uses and not in `avoid`. None when the
/// root bus is not `pci-root` (PCIe root ports: libvirt places the device) or is full.
///
/// Why avoid: a guest that was asked to eject a device may hold a second, stale eject request
/// for its slot (Linux queues one per notification, and ejects whatever sits in the slot when
/// it runs it); a device plugged into that slot right away can be ejected by it.
pub fn free_root_slot(domain_xml: &str, avoid: &[PciSlot]) -> Result<Option<u32>, String> {
    let doc = parse(domain_xml)?;
    let pci_root = devices(&doc).any(|n| {
        n.has_tag_name("controller")
            && n.attribute("type") == Some("pci")
            && n.attribute("model") == Some("pci-root")
    });
    if !pci_root {
        return Ok(None);
    }
    let used: Vec<u32> = devices(&doc)
        .flat_map(|n| n.children())
        .filter(|c| c.has_tag_name("address") && c.attribute("type") == Some("pci"))
        .filter(|a| hex_attr(*a, "bus") == Some(0))
        .filter_map(|a| hex_attr(a, "slot"))
        .collect();
    Ok((1..32).find(|slot| !used.contains(slot) && !avoid.contains(&(0, *slot))))
}

/// `element` plugged at slot `slot` of the root bus (its own address, if any, replaced).
pub fn at_root_slot(element: &str, slot: u32) -> Result<String, String> {
    let bare = without_address(element)?;
    let at = bare
        .rfind("</")
        .ok_or_else(|| format!("device XML: not a device element: {bare}"))?;
    Ok(format!(
        "{}<address type='pci' domain='0x0000' bus='0x00' slot='{slot:#04x}' \
         function='0x0'/>{}",
        &bare[..at],
        &bare[at..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const DOMAIN: &str = "<domain type='qemu' id='1'>
  <name>vm0</name>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <shmem name='ninja-hca0'>
      <model type='ivshmem-plain'/>
      <size unit='M'>1</size>
      <alias name='ua-hca0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>
    </shmem>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source><address domain='0x0000' bus='0x3b' slot='0x00' function='0x1'/></source>
      <alias name='hostdev0'/>
    </hostdev>
  </devices>
</domain>";

    fn device(value: serde_json::Value) -> Device {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn plan_devices_become_libvirt_device_xml() {
        let hca = device(json!({"kind": "hca-standin", "id": "hca0",
            "mem_path": "/dev/shm/ninja-hca0", "size": 1048576}));
        assert_eq!(
            device_xml(&hca).unwrap(),
            "<shmem name='ninja-hca0'><model type='ivshmem-plain'/><size unit='bytes'>1048576</size>\
             <alias name='ua-hca0'/></shmem>"
        );
        let vf = device(json!({"kind": "vfio-pci", "id": "hca1", "host": "0000:3b:00.1"}));
        assert_eq!(
            device_xml(&vf).unwrap(),
            "<hostdev mode='subsystem' type='pci' managed='yes'><source>\
             <address domain='0x0000' bus='0x3b' slot='0x00' function='0x1'/>\
             </source><alias name='ua-hca1'/></hostdev>"
        );
        let nic = device(
            json!({"kind": "virtio-net", "id": "net0", "mac": "52:54:00:00:00:07",
            "netdev": {"type": "bridge", "bridge": "br'0"}}),
        );
        assert_eq!(
            device_xml(&nic).unwrap(),
            "<interface type='bridge'><source bridge='br&apos;0'/><mac address='52:54:00:00:00:07'/>\
             <model type='virtio'/><alias name='ua-net0'/></interface>"
        );
        let user =
            device(json!({"kind": "virtio-net", "id": "ua-net1", "mac": "52:54:00:00:00:08"}));
        assert!(
            device_xml(&user)
                .unwrap()
                .starts_with("<interface type='user'><mac")
        );
        assert!(
            device_xml(&user)
                .unwrap()
                .contains("<alias name='ua-net1'/>")
        );
    }

    #[test]
    fn devices_libvirt_cannot_express_are_refused() {
        let elsewhere = device(json!({"kind": "hca-standin", "id": "hca0",
            "mem_path": "/tmp/hca0", "size": 1048576}));
        assert!(
            device_xml(&elsewhere)
                .unwrap_err()
                .contains("/dev/shm/NAME")
        );
        let options = device(
            json!({"kind": "vfio-pci", "id": "hca1", "host": "0000:3b:00.1",
            "properties": {"addr": "5"}}),
        );
        assert!(device_xml(&options).unwrap_err().contains("properties"));
        let tap = device(
            json!({"kind": "virtio-net", "id": "net0", "mac": "52:54:00:00:00:07",
            "netdev": {"type": "tap", "id": "n0"}}),
        );
        assert!(device_xml(&tap).unwrap_err().contains("bridge"));
    }

    #[test]
    fn a_device_is_found_by_its_alias_with_its_address() {
        let found = find_device(DOMAIN, "ua-hca0").unwrap().unwrap();
        assert!(found.starts_with("<shmem name='ninja-hca0'>"), "{found}");
        assert!(found.ends_with("</shmem>"), "{found}");
        assert!(found.contains("slot='0x03'"));
        assert_eq!(find_device(DOMAIN, "ua-net0").unwrap(), None);
        assert!(find_device("<domain", "x").is_err());
        let bare = without_address(&found).unwrap();
        assert!(!bare.contains("<address"), "{bare}");
        assert!(bare.contains("<alias name='ua-hca0'/>"));
    }

    #[test]
    fn a_standby_nic_is_switched_by_its_link_state() {
        let nic = "<interface type='user'>\n      <mac address='52:54:00:AB:00:01'/>\n      \
                   <model type='virtio'/>\n      <alias name='ua-fab0'/>\n    </interface>";
        let down = with_link(nic, false).unwrap();
        assert!(down.ends_with("<link state='down'/></interface>"), "{down}");
        let up = with_link(&down, true).unwrap();
        assert_eq!(up.matches("<link").count(), 1, "{up}");
        assert!(up.contains("<link state='up'/>"), "{up}");
        assert_eq!(mac_of(nic).as_deref(), Some("52:54:00:ab:00:01"));
        assert!(with_link("<shmem name='x'/>", true).is_err());
        let standby =
            device(json!({"kind": "standby-nic", "id": "fab0", "mac": "52:54:00:ab:00:01"}));
        assert!(check_device(&standby).is_ok());
        assert!(device_xml(&standby).is_err());
    }

    #[test]
    fn a_definition_moves_without_the_detached_devices() {
        let moved = without_devices(DOMAIN, &["ua-hca0".into()]).unwrap();
        assert!(!moved.contains("ua-hca0"), "{moved}");
        assert!(moved.contains("<alias name='hostdev0'/>"));
        assert!(moved.contains("<emulator>"));
        assert_eq!(without_devices(DOMAIN, &[]).unwrap(), DOMAIN);
    }

    #[test]
    fn passthrough_devices_the_plan_leaves_attached_block_the_migration() {
        assert_eq!(
            blocking_devices(DOMAIN, &["hca0"]).unwrap(),
            vec!["hostdev hostdev0".to_owned()]
        );
        assert_eq!(
            blocking_devices(DOMAIN, &[]).unwrap(),
            vec!["shmem ua-hca0".to_owned(), "hostdev hostdev0".to_owned()]
        );
    }

    /// An i440fx domain's root bus: slots 1 (USB), 2 (virtio-serial) and 3 (the HCA) taken.
    const I440FX: &str = "<domain type='qemu'><devices>
    <controller type='usb' index='0' model='piix3-uhci'>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x2'/>
    </controller>
    <controller type='virtio-serial' index='0'>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>
    </controller>
    <controller type='pci' index='0' model='pci-root'/>
    <shmem name='ninja-hca0'><alias name='ua-hca0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>
    </shmem>
  </devices></domain>";

    #[test]
    fn a_hot_plug_avoids_the_slots_just_vacated() {
        let hca = find_device(I440FX, "ua-hca0").unwrap().unwrap();
        assert_eq!(pci_slot(&hca), Some((0, 3)));
        // The host address of a passthrough device is not where the guest sees it.
        let vf = find_device(DOMAIN, "hostdev0").unwrap().unwrap();
        assert_eq!(pci_slot(&vf), None);
        assert_eq!(free_root_slot(I440FX, &[]).unwrap(), Some(4));
        assert_eq!(free_root_slot(I440FX, &[(0, 4), (0, 5)]).unwrap(), Some(6));
        // Without the HCA, its slot is free again, unless it was just vacated.
        let without = without_devices(I440FX, &["ua-hca0".into()]).unwrap();
        assert_eq!(free_root_slot(&without, &[]).unwrap(), Some(3));
        assert_eq!(free_root_slot(&without, &[(0, 3)]).unwrap(), Some(4));
        // PCIe root ports: libvirt places the device.
        let q35 = I440FX.replace("pci-root", "pcie-root");
        assert_eq!(free_root_slot(&q35, &[]).unwrap(), None);
        let moved = at_root_slot(&hca, 6).unwrap();
        assert_eq!(pci_slot(&moved), Some((0, 6)));
        assert!(moved.contains("<alias name='ua-hca0'/>"), "{moved}");
        assert_eq!(moved.matches("<address").count(), 1, "{moved}");
        let nic = "<interface type='bridge'><mac address='52:54:00:00:00:07'/></interface>";
        assert_eq!(pci_slot(&at_root_slot(nic, 31).unwrap()), Some((0, 31)));
    }
}

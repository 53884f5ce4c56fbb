//! OPC UA node ids as plant IT writes them in the config (`ns=<index>;…`,
//! `nsu=<uri>;…` or none: namespace 0): parsed here, so that validation and
//! the OPC UA source read them the same way. Resolving a `nsu=` id against
//! a server's namespaces is the source's business, not this module's.

use std::str::FromStr;

use opcua::types::NodeId;

/// Where a node id's namespace comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeRef {
    /// `ns=<index>` (or none: 0): fixed.
    Index(NodeId),
    /// `nsu=<uri>`: the identifier, and the URI to look up on each session.
    Uri { uri: String, local: NodeId },
}

/// Parses a node id in standard notation, including `nsu=<uri>;`.
pub fn parse_node_id(text: &str) -> Result<NodeRef, String> {
    if let Some(rest) = text.strip_prefix("nsu=") {
        let (uri, id) = rest
            .split_once(';')
            .ok_or_else(|| format!("`{text}`: expected `nsu=<uri>;<i|s|g|b>=<identifier>`"))?;
        if uri.is_empty() {
            return Err(format!("`{text}`: the namespace URI is empty"));
        }
        let local = NodeId::from_str(id).map_err(|_| {
            format!("`{text}`: `{id}` is not `i=`, `s=`, `g=` or `b=` followed by an identifier")
        })?;
        if local.namespace != 0 {
            return Err(format!("`{text}`: give either nsu= or ns=, not both"));
        }
        return Ok(NodeRef::Uri {
            uri: uri.to_owned(),
            local,
        });
    }
    NodeId::from_str(text).map(NodeRef::Index).map_err(|_| {
        format!("`{text}` is not a node id (expected e.g. `ns=2;s=Press07.State`, `i=2258` or `nsu=urn:plant;s=Press07.State`)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_parse_with_index_or_uri() {
        assert_eq!(
            parse_node_id("ns=2;s=Press07.State").unwrap(),
            NodeRef::Index(NodeId::new(2, "Press07.State"))
        );
        assert_eq!(
            parse_node_id("i=2258").unwrap(),
            NodeRef::Index(NodeId::new(0, 2258u32))
        );
        match parse_node_id("nsu=urn:plant:press;s=Counter").unwrap() {
            NodeRef::Uri { uri, local } => {
                assert_eq!(uri, "urn:plant:press");
                assert_eq!(local, NodeId::new(0, "Counter"));
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            "",
            "ns=x;s=a",
            "s",
            "nsu=;s=a",
            "nsu=urn:a",
            "nsu=urn:a;ns=2;s=b",
            "q=1",
        ] {
            assert!(parse_node_id(bad).is_err(), "{bad} should not parse");
        }
    }
}

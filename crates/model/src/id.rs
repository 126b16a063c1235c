//! Typed identifiers: a `GuestId` can never be passed where a `HostId` is
//! expected, yet all of them are UUIDs on the wire.

use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// Names the kind of object an identifier refers to.
pub trait IdKind: Send + Sync + 'static {
    /// Short prefix used in messages, e.g. `guest`.
    const NAME: &'static str;
}

/// A UUID tagged with the kind of object it identifies.
pub struct TypedId<K: IdKind> {
    uuid: Uuid,
    _kind: PhantomData<fn() -> K>,
}

impl<K: IdKind> TypedId<K> {
    pub fn new_v4() -> Self {
        Self::from_uuid(Uuid::new_v4())
    }
    pub const fn from_uuid(uuid: Uuid) -> Self {
        Self { uuid, _kind: PhantomData }
    }
    pub const fn as_uuid(&self) -> &Uuid {
        &self.uuid
    }
}

// Manual impls: derives would put bounds on `K`, which is only a marker.
impl<K: IdKind> Clone for TypedId<K> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<K: IdKind> Copy for TypedId<K> {}
impl<K: IdKind> PartialEq for TypedId<K> {
    fn eq(&self, other: &Self) -> bool {
        self.uuid == other.uuid
    }
}
impl<K: IdKind> Eq for TypedId<K> {}
impl<K: IdKind> PartialOrd for TypedId<K> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<K: IdKind> Ord for TypedId<K> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.uuid.cmp(&other.uuid)
    }
}
impl<K: IdKind> std::hash::Hash for TypedId<K> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.uuid.hash(state)
    }
}
impl<K: IdKind> fmt::Display for TypedId<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.uuid.fmt(f)
    }
}
impl<K: IdKind> fmt::Debug for TypedId<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", K::NAME, self.uuid)
    }
}
impl<K: IdKind> FromStr for TypedId<K> {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self::from_uuid)
    }
}
impl<K: IdKind> Serialize for TypedId<K> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.uuid.serialize(s)
    }
}
impl<'de, K: IdKind> Deserialize<'de> for TypedId<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Uuid::deserialize(d).map(Self::from_uuid)
    }
}
impl<K: IdKind> utoipa::PartialSchema for TypedId<K> {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(utoipa::openapi::KnownFormat::Uuid)))
            .into()
    }
}
impl<K: IdKind> utoipa::ToSchema for TypedId<K> {}

macro_rules! id_kind {
    ($(#[$m:meta])* $kind:ident, $alias:ident, $name:literal) => {
        $(#[$m])*
        #[derive(Debug)]
        pub enum $kind {}
        impl IdKind for $kind {
            const NAME: &'static str = $name;
        }
        $(#[$m])*
        pub type $alias = TypedId<$kind>;
    };
}

id_kind!(
    /// Identifies a guest (the logical machine, not one QEMU process of it).
    GuestMarker, GuestId, "guest"
);
id_kind!(
    /// Identifies a physical host.
    HostMarker, HostId, "host"
);
id_kind!(
    /// Identifies a snapshot of a guest (its name is unique per guest too).
    SnapshotMarker, SnapshotId, "snapshot"
);
id_kind!(
    /// Identifies a long-running operation.
    OperationMarker, OperationId, "op"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_as_plain_uuids() {
        let id = GuestId::new_v4();
        let json = serde_json::to_string(&id).expect("serialize");
        assert_eq!(json, format!("\"{}\"", id.as_uuid()));
        let back: GuestId = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, id);
        assert_eq!(format!("{id:?}"), format!("guest:{}", id.as_uuid()));
    }
}

//! `Deserialize for Envelope`, without `#[serde(flatten)]`.
//!
//! The derived impl of a struct with a flattened field first collects every
//! entry of the map into serde's `Content` (strings copied, a map per
//! nested object) and then deserializes the fields from that: a third of the
//! time of reading a log. This visitor reads the envelope's own fields
//! straight from the input and, at `data`, hands the `type` it has seen and
//! the `data` value to [`Event`]'s own derived impl, through its
//! `[type, data]` sequence form. `Event` stays the one definition of the
//! events' shape (and of their schema).
//!
//! It accepts what the derived impl accepted: fields in any order (`data`
//! before `type` is buffered), unknown fields ignored, `null` or a missing
//! field for the `Option`s, defaults for `actor_verified` and `hash`.

use crate::domain::envelope::Envelope;
use crate::domain::event::Event;
use crate::domain::ids::ProjectId;
use crate::domain::timestamp;
use serde::de::value::StrDeserializer;
use serde::de::{
    self, DeserializeSeed, Deserializer, IgnoredAny, IntoDeserializer, MapAccess, SeqAccess,
    Visitor,
};
use serde::{Deserialize, forward_to_deserialize_any};
use std::fmt;
use uuid::Uuid;

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum Field {
    Seq,
    EventId,
    SchemaVersion,
    ProjectId,
    JobId,
    JobVersion,
    CommandId,
    Actor,
    ActorVerified,
    RecordedAt,
    PrevHash,
    #[serde(rename = "type")]
    Type,
    Data,
    Hash,
    #[serde(other)]
    Other,
}

/// The value of `type`, borrowed from the input when it can be.
enum Tag<'de> {
    Borrowed(&'de str),
    Owned(String),
}

impl Tag<'_> {
    fn as_str(&self) -> &str {
        match self {
            Tag::Borrowed(s) => s,
            Tag::Owned(s) => s,
        }
    }
}

impl<'de> Deserialize<'de> for Tag<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Tag<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an event type")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Tag<'de>, E> {
                Ok(Tag::Borrowed(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Tag<'de>, E> {
                Ok(Tag::Owned(v.to_owned()))
            }
        }
        d.deserialize_str(V)
    }
}

/// `[type, data]` as a sequence, for `Event`'s derived (adjacently tagged)
/// impl, which reads its variant from the first element and the variant's
/// content from the second.
struct TagThenData<'a, D> {
    tag: &'a str,
    data: Option<D>,
    /// Elements handed out so far.
    given: u8,
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for TagThenData<'_, D> {
    type Error = D::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        visitor.visit_seq(self)
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

impl<'de, D: Deserializer<'de>> SeqAccess<'de> for TagThenData<'_, D> {
    type Error = D::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, D::Error> {
        self.given += 1;
        match self.given {
            1 => seed
                .deserialize(StrDeserializer::<D::Error>::new(self.tag))
                .map(Some),
            2 => match self.data.take() {
                Some(data) => seed.deserialize(data).map(Some),
                None => Ok(None),
            },
            _ => Ok(None),
        }
    }
}

/// Deserializes `data` as the content of the event variant `tag`.
struct DataOf<'a>(&'a str);

impl<'de> DeserializeSeed<'de> for DataOf<'_> {
    type Value = Event;

    fn deserialize<D: Deserializer<'de>>(self, data: D) -> Result<Event, D::Error> {
        Event::deserialize(TagThenData {
            tag: self.0,
            data: Some(data),
            given: 0,
        })
    }
}

/// `DateTime<Utc>` through [`timestamp::deserialize`].
struct Timestamp(chrono::DateTime<chrono::Utc>);

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        timestamp::deserialize(d).map(Timestamp)
    }
}

/// Reads an envelope; with `state_only`, the fields no fold reads
/// (`event_id`, `command_id`, `actor`, `prev_hash`, `hash`) are checked to
/// be JSON, the required ones present, and left blank: nil ids, no actor,
/// empty hashes ([`Envelope::from_json_state`]).
pub(crate) struct EnvelopeVisitor {
    pub(crate) state_only: bool,
}

fn set<'de, T: Deserialize<'de>, A: MapAccess<'de>>(
    slot: &mut Option<T>,
    map: &mut A,
    name: &'static str,
) -> Result<(), A::Error> {
    if slot.is_some() {
        return Err(de::Error::duplicate_field(name));
    }
    *slot = Some(map.next_value()?);
    Ok(())
}

fn required<T, E: de::Error>(slot: Option<T>, name: &'static str) -> Result<T, E> {
    slot.ok_or_else(|| E::missing_field(name))
}

impl<'de> Visitor<'de> for EnvelopeVisitor {
    type Value = Envelope;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("struct Envelope")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Envelope, A::Error> {
        let mut seq: Option<u64> = None;
        let mut event_id: Option<Uuid> = None;
        let mut schema_version: Option<u32> = None;
        let mut project_id: Option<ProjectId> = None;
        let mut job_id: Option<Option<Uuid>> = None;
        let mut job_version: Option<Option<u64>> = None;
        let mut command_id: Option<Uuid> = None;
        let mut actor: Option<Option<String>> = None;
        let mut actor_verified: Option<bool> = None;
        let mut recorded_at: Option<Timestamp> = None;
        let mut prev_hash: Option<String> = None;
        let mut tag: Option<Tag<'de>> = None;
        let mut event: Option<Event> = None;
        // `data` seen before `type`: kept until the type is known.
        let mut early_data: Option<serde_json::Value> = None;
        let mut hash: Option<String> = None;
        // What a state-only read skips: seen or not, no value kept.
        let [
            mut event_id_seen,
            mut command_id_seen,
            mut actor_seen,
            mut prev_hash_seen,
            mut hash_seen,
        ] = [None; 5];
        while let Some(key) = map.next_key::<Field>()? {
            if self.state_only {
                let skipped = match key {
                    Field::EventId => Some((&mut event_id_seen, "event_id")),
                    Field::CommandId => Some((&mut command_id_seen, "command_id")),
                    Field::Actor => Some((&mut actor_seen, "actor")),
                    Field::PrevHash => Some((&mut prev_hash_seen, "prev_hash")),
                    Field::Hash => Some((&mut hash_seen, "hash")),
                    _ => None,
                };
                if let Some((seen, name)) = skipped {
                    set::<IgnoredAny, _>(seen, &mut map, name)?;
                    continue;
                }
            }
            match key {
                Field::Seq => set(&mut seq, &mut map, "seq")?,
                Field::EventId => set(&mut event_id, &mut map, "event_id")?,
                Field::SchemaVersion => set(&mut schema_version, &mut map, "schema_version")?,
                Field::ProjectId => set(&mut project_id, &mut map, "project_id")?,
                Field::JobId => set(&mut job_id, &mut map, "job_id")?,
                Field::JobVersion => set(&mut job_version, &mut map, "job_version")?,
                Field::CommandId => set(&mut command_id, &mut map, "command_id")?,
                Field::Actor => set(&mut actor, &mut map, "actor")?,
                Field::ActorVerified => set(&mut actor_verified, &mut map, "actor_verified")?,
                Field::RecordedAt => set(&mut recorded_at, &mut map, "recorded_at")?,
                Field::PrevHash => set(&mut prev_hash, &mut map, "prev_hash")?,
                Field::Hash => set(&mut hash, &mut map, "hash")?,
                Field::Type => set(&mut tag, &mut map, "type")?,
                Field::Data => {
                    if event.is_some() || early_data.is_some() {
                        return Err(de::Error::duplicate_field("data"));
                    }
                    match &tag {
                        Some(t) => event = Some(map.next_value_seed(DataOf(t.as_str()))?),
                        None => early_data = Some(map.next_value()?),
                    }
                }
                Field::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let tag = required(tag, "type")?;
        let event = match (event, early_data) {
            (Some(e), _) => e,
            (None, Some(data)) => DataOf(tag.as_str())
                .deserialize(data)
                .map_err(de::Error::custom)?,
            // No `data`: what the adjacently tagged impl says of a map with
            // only the tag (an error for every variant bcp has).
            (None, None) => Event::deserialize(
                [("type", tag.as_str())]
                    .into_iter()
                    .collect::<std::collections::BTreeMap<_, _>>()
                    .into_deserializer(),
            )?,
        };
        if self.state_only {
            required(event_id_seen, "event_id")?;
            required(command_id_seen, "command_id")?;
            required(prev_hash_seen, "prev_hash")?;
            event_id = Some(Uuid::nil());
            command_id = Some(Uuid::nil());
            prev_hash = Some(String::new());
        }
        Ok(Envelope {
            seq: required(seq, "seq")?,
            event_id: required(event_id, "event_id")?,
            schema_version: required(schema_version, "schema_version")?,
            project_id: required(project_id, "project_id")?,
            job_id: job_id.flatten(),
            job_version: job_version.flatten(),
            command_id: required(command_id, "command_id")?,
            actor: actor.flatten(),
            actor_verified: actor_verified.unwrap_or_default(),
            recorded_at: required(recorded_at, "recorded_at")?.0,
            prev_hash: required(prev_hash, "prev_hash")?,
            event,
            hash: hash.unwrap_or_default(),
        })
    }
}

impl<'de> Deserialize<'de> for Envelope {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(EnvelopeVisitor { state_only: false })
    }
}

/// The derived impl this one replaces, to compare against in tests.
#[cfg(test)]
pub(crate) mod derived {
    use super::*;
    use chrono::{DateTime, Utc};

    #[derive(Debug, Deserialize)]
    pub struct Flattened {
        pub seq: u64,
        pub event_id: Uuid,
        pub schema_version: u32,
        pub project_id: ProjectId,
        pub job_id: Option<Uuid>,
        pub job_version: Option<u64>,
        pub command_id: Uuid,
        pub actor: Option<String>,
        #[serde(default)]
        pub actor_verified: bool,
        pub recorded_at: DateTime<Utc>,
        pub prev_hash: String,
        #[serde(flatten)]
        pub event: Event,
        #[serde(default)]
        pub hash: String,
    }

    impl From<Flattened> for Envelope {
        fn from(f: Flattened) -> Envelope {
            Envelope {
                seq: f.seq,
                event_id: f.event_id,
                schema_version: f.schema_version,
                project_id: f.project_id,
                job_id: f.job_id,
                job_version: f.job_version,
                command_id: f.command_id,
                actor: f.actor,
                actor_verified: f.actor_verified,
                recorded_at: f.recorded_at,
                prev_hash: f.prev_hash,
                event: f.event,
                hash: f.hash,
            }
        }
    }
}

//! pprof's profile format (`profile.proto` of github.com/google/pprof), encoded by hand
//! (the messages are few and flat) and gzipped (`flate2`, pure Rust).
//!
//! As Go's heap profiles: sample types `alloc_objects`/count, `alloc_space`/bytes,
//! `inuse_objects`/count, `inuse_space`/bytes (pprof shows the last by default), the
//! period type `space`/bytes with the sampling rate as the period, values already
//! scaled for sampling, and a `bytes` label with each stack's average object size. Every
//! location carries its functions and lines (resolved when writing), so pprof needs no
//! binary to show it; one mapping (the executable) covers them all.

use std::collections::HashMap;
use std::io::{self, Write};

use super::Symbolized;

// Field numbers of profile.proto.
mod field {
    // Profile
    pub const SAMPLE_TYPE: u32 = 1;
    pub const SAMPLE: u32 = 2;
    pub const MAPPING: u32 = 3;
    pub const LOCATION: u32 = 4;
    pub const FUNCTION: u32 = 5;
    pub const STRING_TABLE: u32 = 6;
    pub const TIME_NANOS: u32 = 9;
    pub const PERIOD_TYPE: u32 = 11;
    pub const PERIOD: u32 = 12;
    // ValueType
    pub const VT_TYPE: u32 = 1;
    pub const VT_UNIT: u32 = 2;
    // Sample
    pub const S_LOCATION_ID: u32 = 1;
    pub const S_VALUE: u32 = 2;
    pub const S_LABEL: u32 = 3;
    // Label
    pub const L_KEY: u32 = 1;
    pub const L_NUM: u32 = 3;
    pub const L_NUM_UNIT: u32 = 4;
    // Mapping
    pub const M_ID: u32 = 1;
    pub const M_START: u32 = 2;
    pub const M_LIMIT: u32 = 3;
    pub const M_FILENAME: u32 = 5;
    pub const M_HAS_FUNCTIONS: u32 = 7;
    pub const M_HAS_FILENAMES: u32 = 8;
    pub const M_HAS_LINE_NUMBERS: u32 = 9;
    pub const M_HAS_INLINE_FRAMES: u32 = 10;
    // Location
    pub const LOC_ID: u32 = 1;
    pub const LOC_MAPPING_ID: u32 = 2;
    pub const LOC_ADDRESS: u32 = 3;
    pub const LOC_LINE: u32 = 4;
    // Line
    pub const LINE_FUNCTION_ID: u32 = 1;
    pub const LINE_LINE: u32 = 2;
    // Function
    pub const F_ID: u32 = 1;
    pub const F_NAME: u32 = 2;
    pub const F_SYSTEM_NAME: u32 = 3;
    pub const F_FILENAME: u32 = 4;
}

/// A protobuf message being built.
#[derive(Default)]
struct Msg(Vec<u8>);

impl Msg {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push(v as u8 | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn key(&mut self, field: u32, wire: u8) {
        self.varint(u64::from(field) << 3 | u64::from(wire));
    }

    /// A varint field (int64, uint64, bool); zero is the default and is left out.
    fn uint(&mut self, field: u32, v: u64) {
        if v != 0 {
            self.key(field, 0);
            self.varint(v);
        }
    }

    fn bytes(&mut self, field: u32, b: &[u8]) {
        self.key(field, 2);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
    }

    fn msg(&mut self, field: u32, m: &Msg) {
        self.bytes(field, &m.0);
    }

    /// A packed repeated varint field.
    fn packed(&mut self, field: u32, vs: impl Iterator<Item = u64>) {
        let mut p = Msg::default();
        for v in vs {
            p.varint(v);
        }
        if !p.0.is_empty() {
            self.bytes(field, &p.0);
        }
    }
}

/// The string table: index 0 is "".
struct Strings {
    index: HashMap<String, u64>,
    table: Vec<String>,
}

impl Strings {
    fn new() -> Self {
        Strings {
            index: HashMap::from([(String::new(), 0)]),
            table: vec![String::new()],
        }
    }

    fn id(&mut self, s: &str) -> u64 {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = self.table.len() as u64;
        self.index.insert(s.to_string(), i);
        self.table.push(s.to_string());
        i
    }
}

impl Symbolized {
    /// The profile as pprof's protobuf, not compressed.
    pub fn pprof_bytes(&self) -> Vec<u8> {
        let mut s = Strings::new();
        let mut p = Msg::default();
        for (t, u) in [
            ("alloc_objects", "count"),
            ("alloc_space", "bytes"),
            ("inuse_objects", "count"),
            ("inuse_space", "bytes"),
        ] {
            let mut vt = Msg::default();
            vt.uint(field::VT_TYPE, s.id(t));
            vt.uint(field::VT_UNIT, s.id(u));
            p.msg(field::SAMPLE_TYPE, &vt);
        }
        let bytes_key = s.id("bytes");
        for st in &self.stacks {
            let v = &st.values;
            if v.alloc_objects == 0 && v.inuse_objects == 0 {
                continue;
            }
            let mut m = Msg::default();
            // Location ids are indices + 1 (0 is not a valid id).
            m.packed(
                field::S_LOCATION_ID,
                st.locations.iter().map(|&l| l as u64 + 1),
            );
            m.packed(
                field::S_VALUE,
                [
                    v.alloc_objects,
                    v.alloc_space,
                    v.inuse_objects,
                    v.inuse_space,
                ]
                .into_iter(),
            );
            let mut label = Msg::default();
            label.uint(field::L_KEY, bytes_key);
            label.uint(field::L_NUM, st.avg_size);
            label.uint(field::L_NUM_UNIT, bytes_key);
            m.msg(field::S_LABEL, &label);
            p.msg(field::SAMPLE, &m);
        }
        let exe = std::env::current_exe()
            .map(|e| e.display().to_string())
            .unwrap_or_default();
        let mut mapping = Msg::default();
        mapping.uint(field::M_ID, 1);
        mapping.uint(field::M_START, 0);
        mapping.uint(field::M_LIMIT, u64::MAX);
        mapping.uint(field::M_FILENAME, s.id(&exe));
        for f in [
            field::M_HAS_FUNCTIONS,
            field::M_HAS_FILENAMES,
            field::M_HAS_LINE_NUMBERS,
            field::M_HAS_INLINE_FRAMES,
        ] {
            mapping.uint(f, 1);
        }
        p.msg(field::MAPPING, &mapping);
        // Functions: one per (name, file).
        let mut functions: HashMap<(String, String), u64> = HashMap::new();
        let mut function_msgs: Vec<Msg> = Vec::new();
        for (i, loc) in self.locations.iter().enumerate() {
            let mut l = Msg::default();
            l.uint(field::LOC_ID, i as u64 + 1);
            l.uint(field::LOC_MAPPING_ID, 1);
            l.uint(field::LOC_ADDRESS, loc.addr as u64);
            for fr in &loc.frames {
                let file = fr.file.clone().unwrap_or_default();
                let key = (fr.function.clone(), file);
                let next = functions.len() as u64 + 1;
                let id = *functions.entry(key).or_insert_with(|| {
                    let mut f = Msg::default();
                    f.uint(field::F_ID, next);
                    let name = s.id(&fr.function);
                    f.uint(field::F_NAME, name);
                    f.uint(field::F_SYSTEM_NAME, name);
                    f.uint(field::F_FILENAME, s.id(fr.file.as_deref().unwrap_or("")));
                    function_msgs.push(f);
                    next
                });
                let mut line = Msg::default();
                line.uint(field::LINE_FUNCTION_ID, id);
                line.uint(field::LINE_LINE, u64::from(fr.line.unwrap_or(0)));
                l.msg(field::LOC_LINE, &line);
            }
            p.msg(field::LOCATION, &l);
        }
        for f in &function_msgs {
            p.msg(field::FUNCTION, f);
        }
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        p.uint(field::TIME_NANOS, time);
        let mut pt = Msg::default();
        pt.uint(field::VT_TYPE, s.id("space"));
        pt.uint(field::VT_UNIT, s.id("bytes"));
        p.msg(field::PERIOD_TYPE, &pt);
        p.uint(field::PERIOD, self.rate as u64);
        for st in &s.table {
            p.bytes(field::STRING_TABLE, st.as_bytes());
        }
        p.0
    }

    /// Writes the profile as pprof's protobuf, gzipped (what `go tool pprof` reads).
    pub fn write_pprof(&self, w: &mut dyn Write) -> io::Result<()> {
        let mut gz = flate2::write::GzEncoder::new(w, flate2::Compression::default());
        gz.write_all(&self.pprof_bytes())?;
        gz.finish()?;
        Ok(())
    }
}

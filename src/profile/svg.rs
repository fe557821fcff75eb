//! A flame graph as SVG, written directly (no external tool): Brendan Gregg's layout,
//! root at the bottom, each frame as wide as its share of the sample type, siblings in
//! alphabetical order, warm colours from a hash of the function name (the same input
//! gives the same file). The stacks and their names are those of the collapsed output
//! (`text.rs`), with the names kept whole (spaces and `;` included).

use std::collections::BTreeMap;
use std::io::{self, Write};

use super::text::{human, is_bytes, type_name};
use super::{SampleType, Symbolized};

/// The image's width, its side margins, and the height of a level of frames.
const WIDTH: f64 = 1200.0;
const PAD: f64 = 10.0;
const FRAME_H: f64 = 16.0;
/// Room above the frames for the title and the subtitle, and below them.
const TOP: f64 = 56.0;
const BOTTOM: f64 = 10.0;
const FONT: f64 = 12.0;
/// The approximate width of a character of the frames' font.
const CHAR_W: f64 = 0.6 * FONT;
/// Frames narrower than this (in pixels) are not drawn, nor anything above them.
const MIN_W: f64 = 0.1;
/// The bottom frame: every stack.
const ROOT: &str = "all";

/// A frame of the merged stacks: its total (its own stacks and those above it) and the
/// frames called from it, by name (a `BTreeMap`: sorted).
#[derive(Default)]
struct Node<'a> {
    value: u64,
    children: BTreeMap<&'a str, Node<'a>>,
}

/// A frame as drawn: its level (0: the bottom), its left and right edges in hundredths
/// of a pixel (rounded from the cumulative value, so that children never reach past
/// their parent), and its value.
#[derive(Debug)]
struct Placed<'a> {
    name: &'a str,
    depth: usize,
    x0: i64,
    x1: i64,
    value: u64,
}

/// The tree of the stacks with a non-zero value of `t`, merged by common prefixes.
fn tree<'a>(p: &'a Symbolized, t: SampleType) -> Node<'a> {
    let mut root = Node::default();
    for s in &p.stacks {
        let v = s.values.get(t);
        if v == 0 {
            continue;
        }
        root.value += v;
        let mut n = &mut root;
        for name in p.root_to_leaf(s) {
            n = n.children.entry(name).or_default();
            n.value += v;
        }
    }
    root
}

/// Lays out `node` (named `name`, at `depth`, starting at cumulative value `start`) and
/// the frames above it, depth first. `scale` is hundredths of a pixel per unit.
fn place<'a>(
    node: &Node<'a>,
    name: &'a str,
    depth: usize,
    start: u64,
    scale: f64,
    out: &mut Vec<Placed<'a>>,
) {
    if node.value as f64 * scale < MIN_W * 100.0 {
        return;
    }
    let x = |v: u64| (PAD * 100.0 + v as f64 * scale).round() as i64;
    out.push(Placed {
        name,
        depth,
        x0: x(start),
        x1: x(start + node.value),
        value: node.value,
    });
    let mut at = start;
    for (&child, n) in &node.children {
        place(n, child, depth + 1, at, scale, out);
        at += n.value;
    }
}

/// Every frame to draw, the bottom one (`all`) first; none if the total is 0.
fn layout<'a>(root: &Node<'a>) -> Vec<Placed<'a>> {
    let mut out = Vec::new();
    if root.value > 0 {
        let scale = (WIDTH - 2.0 * PAD) * 100.0 / root.value as f64;
        place(root, ROOT, 0, 0, scale, &mut out);
    }
    out
}

/// `s` with XML's special characters escaped (for text and attribute values).
fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            // Not allowed in XML 1.0, even escaped.
            c if c < ' ' && !matches!(c, '\t' | '\n' | '\r') => o.push('?'),
            c => o.push(c),
        }
    }
    o
}

/// What of `name` fits in `width` pixels (less a 3 px margin each side): the whole
/// name, or its start ended with `..`; nothing if fewer than 3 characters fit.
fn fit(name: &str, width: f64) -> Option<String> {
    let room = ((width - 6.0) / CHAR_W).floor();
    if room < 3.0 {
        return None;
    }
    let room = room as usize;
    if name.chars().count() <= room {
        return Some(name.to_string());
    }
    let mut s: String = name.chars().take(room - 2).collect();
    s.push_str("..");
    Some(s)
}

/// A warm colour (red to yellow, as flamegraph.pl's "hot" palette) from an FNV-1a hash
/// of the name: the same name always gets the same colour.
fn colour(name: &str) -> (u8, u8, u8) {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let f = |shift: u32| ((h >> shift) & 0xff) as f64 / 255.0;
    (
        (205.0 + 50.0 * f(0)) as u8,
        (230.0 * f(8)) as u8,
        (55.0 * f(16)) as u8,
    )
}

/// Hundredths of a pixel as a decimal.
fn px(v: i64) -> String {
    format!("{}.{:02}", v / 100, v % 100)
}

impl Symbolized {
    /// Writes a flame graph of `t` as an SVG image (1200 px wide, 16 px per frame, the
    /// root at the bottom) with `title` on top: a frame per function and the stack
    /// under it, as wide as its share of `t`, with a tooltip of its name, value and
    /// percentage. The stacks are those of [`Symbolized::write_collapsed`]; frames
    /// narrower than 0.1 px are left out. A profile with no value of `t` gives an
    /// image with the titles alone.
    pub fn write_svg(&self, w: &mut dyn Write, t: SampleType, title: &str) -> io::Result<()> {
        let root = tree(self, t);
        let frames = layout(&root);
        let levels = frames.iter().map(|f| f.depth + 1).max().unwrap_or(0);
        let height = TOP + levels as f64 * FRAME_H + BOTTOM;
        let bytes = is_bytes(t);
        writeln!(
            w,
            r#"<?xml version="1.0" encoding="UTF-8" standalone="no"?>"#
        )?;
        writeln!(
            w,
            r#"<svg version="1.1" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" xmlns="http://www.w3.org/2000/svg">"#
        )?;
        writeln!(
            w,
            "<style>text{{font-family:Verdana,sans-serif;font-size:{FONT}px;fill:#000}}\
             .t{{font-size:17px}}g:hover rect{{stroke:#000;stroke-width:0.5}}</style>"
        )?;
        writeln!(
            w,
            r##"<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="#f8f8f0"/>"##
        )?;
        let mid = WIDTH / 2.0;
        writeln!(
            w,
            r#"<text class="t" x="{mid}" y="24" text-anchor="middle">{}</text>"#,
            escape(title)
        )?;
        let sub = if root.value == 0 {
            format!("{}: no samples", type_name(t))
        } else {
            format!(
                "{}: {} in all, sampled every {} bytes on average",
                type_name(t),
                human(root.value, bytes),
                self.rate
            )
        };
        writeln!(
            w,
            r#"<text x="{mid}" y="44" text-anchor="middle">{}</text>"#,
            escape(&sub)
        )?;
        for f in &frames {
            let y = height - BOTTOM - (f.depth + 1) as f64 * FRAME_H;
            let width = f.x1 - f.x0;
            let pct = f.value as f64 * 100.0 / root.value as f64;
            let name = escape(f.name);
            let (r, g, b) = colour(f.name);
            write!(
                w,
                r#"<g><title>{name} ({}, {pct:.2}%)</title><rect x="{}" y="{y}" width="{}" height="{}" rx="2" fill="rgb({r},{g},{b})"/>"#,
                human(f.value, bytes),
                px(f.x0),
                px(width),
                FRAME_H - 1.0,
            )?;
            if let Some(text) = fit(f.name, width as f64 / 100.0) {
                write!(
                    w,
                    r#"<text x="{}" y="{}">{}</text>"#,
                    px(f.x0 + 300),
                    y + FRAME_H - 4.5,
                    escape(&text)
                )?;
            }
            writeln!(w, "</g>")?;
        }
        writeln!(w, "</svg>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{Frame, Location, Stack, Values};

    /// A profile of stacks given root first, each with its in-use bytes.
    fn profile(stacks: &[(&[&str], u64)]) -> Symbolized {
        let mut locations = Vec::new();
        let mut out = Vec::new();
        for (names, v) in stacks {
            let mut locs = Vec::new();
            for n in names.iter().rev() {
                locations.push(Location {
                    addr: 0x1000 + locations.len(),
                    frames: vec![Frame {
                        function: n.to_string(),
                        file: None,
                        line: None,
                    }],
                });
                locs.push(locations.len() - 1);
            }
            out.push(Stack {
                locations: locs,
                values: Values {
                    inuse_space: *v,
                    alloc_space: *v * 2,
                    ..Values::default()
                },
                sampled_allocs: 1,
                sampled_inuse: 1,
                avg_size: *v,
            });
        }
        Symbolized {
            rate: 4096,
            locations,
            stacks: out,
        }
    }

    fn svg(p: &Symbolized, title: &str) -> String {
        let mut b = Vec::new();
        p.write_svg(&mut b, SampleType::InuseSpace, title).unwrap();
        String::from_utf8(b).unwrap()
    }

    /// An element: its name, attributes, its text (unescaped) and its children.
    #[derive(Debug, Default)]
    struct El {
        name: String,
        attrs: Vec<(String, String)>,
        text: String,
        kids: Vec<El>,
    }

    impl El {
        fn attr(&self, k: &str) -> f64 {
            let v = &self.attrs.iter().find(|a| a.0 == k).unwrap().1;
            v.parse().unwrap()
        }
    }

    fn unescape(s: &str) -> String {
        let mut rest = s;
        let mut o = String::new();
        while let Some(i) = rest.find('&') {
            o.push_str(&rest[..i]);
            let end = rest[i..].find(';').expect("unterminated entity") + i;
            o.push(match &rest[i + 1..end] {
                "amp" => '&',
                "lt" => '<',
                "gt" => '>',
                "quot" => '"',
                "apos" => '\'',
                e => panic!("unknown entity &{e};"),
            });
            rest = &rest[end + 1..];
        }
        assert!(!rest.contains(['<', '>']), "unescaped {rest:?}");
        o + rest
    }

    /// A minimal XML parser: panics unless the document is one balanced element after
    /// the declaration, with quoted attributes and escaped text.
    fn parse(doc: &str) -> El {
        let doc = doc.strip_prefix("<?xml").unwrap();
        let mut rest = &doc[doc.find("?>").unwrap() + 2..];
        let mut stack = vec![El::default()];
        while let Some(i) = rest.find('<') {
            let text = unescape(&rest[..i]);
            stack.last_mut().unwrap().text.push_str(&text);
            let end = rest[i..].find('>').unwrap() + i;
            let tag = &rest[i + 1..end];
            rest = &rest[end + 1..];
            if let Some(name) = tag.strip_prefix('/') {
                let el = stack.pop().unwrap();
                assert_eq!(el.name, name, "mismatched closing tag");
                stack.last_mut().unwrap().kids.push(el);
                continue;
            }
            let (tag, empty) = match tag.strip_suffix('/') {
                Some(t) => (t, true),
                None => (tag, false),
            };
            let (name, mut a) = tag.split_once(' ').unwrap_or((tag, ""));
            let mut el = El {
                name: name.to_string(),
                ..El::default()
            };
            while let Some(eq) = a.find("=\"") {
                let close = a[eq + 2..].find('"').unwrap() + eq + 2;
                let v = unescape(&a[eq + 2..close]);
                el.attrs.push((a[..eq].trim().to_string(), v));
                a = &a[close + 1..];
            }
            assert!(a.trim().is_empty(), "bad attributes {a:?}");
            if empty {
                stack.last_mut().unwrap().kids.push(el);
            } else {
                stack.push(el);
            }
        }
        assert!(rest.trim().is_empty());
        assert_eq!(stack.len(), 1, "unclosed elements");
        let mut top = stack.pop().unwrap().kids;
        assert_eq!(top.len(), 1, "one root element");
        top.pop().unwrap()
    }

    /// The frames of an image: (title, level from the bottom, x, width).
    fn frames(svg: &El) -> Vec<(String, i64, f64, f64)> {
        let h = svg.attr("height");
        let gs = svg.kids.iter().filter(|k| k.name == "g");
        gs.map(|g| {
            let title = g.kids.iter().find(|k| k.name == "title").unwrap();
            let r = g.kids.iter().find(|k| k.name == "rect").unwrap();
            let level = ((h - BOTTOM - r.attr("y")) / FRAME_H).round() as i64 - 1;
            (title.text.clone(), level, r.attr("x"), r.attr("width"))
        })
        .collect()
    }

    const STACKS: &[(&[&str], u64)] = &[
        (&["main", "run", "load_config"], 2 << 20),
        (&["main", "run", "Cache::insert"], 24 << 20),
        (&["main", "run", "Cache::insert"], 1 << 20),
        (&["main", "worker"], 4 << 20),
        (&["main", "run"], 512),
        (&["thread_start", "worker"], 16 << 20),
        (&[], 100_000),
    ];

    #[test]
    fn well_formed_and_children_fit_in_their_parents() {
        let p = profile(STACKS);
        let doc = parse(&svg(&p, "heap"));
        assert_eq!(doc.name, "svg");
        let fs = frames(&doc);
        // all, main, thread_start, [allocator], run, worker (twice), load_config,
        // Cache::insert (merged).
        assert_eq!(fs.len(), 9, "{fs:?}");
        assert!(fs[0].0.starts_with("all (47.10MiB, 100.00%)"), "{fs:?}");
        assert!((fs[0].3 - (WIDTH - 2.0 * PAD)).abs() < 0.02, "{fs:?}");
        for p in &fs {
            let kids: Vec<_> = fs
                .iter()
                .filter(|c| c.1 == p.1 + 1 && c.2 >= p.2 && c.2 < p.2 + p.3)
                .collect();
            let sum: f64 = kids.iter().map(|c| c.3).sum();
            assert!(sum <= p.3 + 1e-9, "{p:?}: {kids:?}");
            for c in kids {
                assert!(c.2 + c.3 <= p.2 + p.3 + 1e-9, "{c:?} past {p:?}");
            }
        }
        // Siblings in alphabetical order, left to right.
        let level1: Vec<&str> = fs.iter().filter(|f| f.1 == 1).map(|f| &f.0[..]).collect();
        assert!(level1[0].starts_with("[allocator]"), "{level1:?}");
        assert!(level1[1].starts_with("main ("), "{level1:?}");
        assert!(level1[2].starts_with("thread_start ("), "{level1:?}");
        // The same input, the same bytes.
        assert_eq!(svg(&p, "heap"), svg(&profile(STACKS), "heap"));
    }

    #[test]
    fn the_heaviest_stack_is_the_widest() {
        let p = profile(&[
            (&["a", "small"], 100),
            (&["b", "big"], 5000),
            (&["c", "medium"], 900),
        ]);
        let fs = frames(&parse(&svg(&p, "t")));
        let widest = |level| {
            fs.iter()
                .filter(|f| f.1 == level)
                .max_by(|x, y| x.3.total_cmp(&y.3))
                .unwrap()
                .0
                .clone()
        };
        assert!(widest(1).starts_with("b (4.88KiB, 83.33%)"), "{fs:?}");
        assert!(widest(2).starts_with("big ("), "{fs:?}");
    }

    #[test]
    fn names_and_title_are_escaped() {
        let name = "<alloc::vec::Vec<T> as Clone>::clone & 'x' \"y\"";
        let p = profile(&[(&["main", name], 1 << 20)]);
        let s = svg(&p, "a <b> & 'c'");
        assert!(!s.contains("Vec<T>"));
        assert!(s.contains(
            "&lt;alloc::vec::Vec&lt;T&gt; as Clone&gt;::clone &amp; &apos;x&apos; &quot;y&quot;"
        ));
        let doc = parse(&s);
        let title = doc.kids.iter().find(|k| k.name == "text").unwrap();
        assert_eq!(title.text, "a <b> & 'c'");
        assert!(frames(&doc)
            .iter()
            .any(|f| f.0.starts_with(name) && f.1 == 2));
    }

    #[test]
    fn zero_gives_an_empty_graph() {
        let p = profile(&[(&["main", "f"], 0)]);
        let doc = parse(&svg(&p, "empty"));
        assert!(frames(&doc).is_empty());
        let empty = Symbolized {
            rate: 1,
            locations: Vec::new(),
            stacks: Vec::new(),
        };
        assert!(frames(&parse(&svg(&empty, "none"))).is_empty());
    }

    #[test]
    fn narrow_frames_are_left_out_and_labels_truncated() {
        let p = profile(&[(&["wide_function_name"], 1 << 30), (&["tiny"], 1)]);
        let s = svg(&p, "t");
        let fs = frames(&parse(&s));
        assert!(fs.iter().all(|f| !f.0.starts_with("tiny")), "{fs:?}");
        assert_eq!(fit("abcdefghij", 6.0 + 5.5 * CHAR_W).unwrap(), "abc..");
        assert_eq!(fit("abcde", 6.0 + 5.5 * CHAR_W).unwrap(), "abcde");
        assert!(fit("abcde", 6.0 + 2.9 * CHAR_W).is_none());
        assert_eq!(colour("main"), colour("main"));
    }
}

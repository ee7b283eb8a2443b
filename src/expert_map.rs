//! The `--numa-expert-map` language (also NUMA_MOE_EXPERT_MAP): parse, render, check.
//!
//! ```text
//! map      = rule , { ";" , rule } ;
//! rule     = [ "blk." , ranges , "=" ] , body ;      (no "blk." prefix: the default rule)
//! body     = policy , [ "@" , nodes ]  |  balanced , [ "@" , nodes ]  |  clause , { "," , clause } ;
//! policy   = "auto" | "rows" | "block" | "round-robin" | "interleave" | "mirror" | "off" ;
//! balanced = "balanced" , [ ":" , path ] , [ "+copies=" , int , "%" ] ;
//! path     = the characters up to the next "@", "+", ";" or the end, spaces at both ends
//!            dropped; non-empty, without ","       (a routing profile, docs/ROUTING.md)
//! clause   = experts , ":" , nodeset ;
//! experts  = "*" | range ;                           ("*": every expert no other clause maps)
//! ranges   = range , { "," , range } ;
//! range    = int , [ "-" , int ] ;                   (inclusive)
//! nodeset  = int , { "+" , int } ;                   (several nodes: a copy on each)
//! nodes    = int , { "," , int } ;
//! ```
//!
//! Examples: `rows`, `rows@0,1`, `0-7:0,8-15:1`, `0-3:0+1,4-7:1`, `0-7:0,*:1`,
//! `blk.0-2=mirror;blk.3-60=rows`, `balanced:run.json+copies=5%@0,1`. Layers no rule selects
//! stay on llama.cpp's own path.
//!
//! `balanced` names a routing profile; parsing does not read it: [`crate::config`] loads it
//! when the map is set ([`Balanced::profile`]), so the planner stays pure.
//!
//! Errors carry the byte span of the offending text so messages can point at it. Checks come
//! in three stages, each before any memory is touched: syntax ([`ExpertMap::parse`]), the
//! machine ([`ExpertMap::check_nodes`]) and each expert tensor ([`ExpertMap::resolve`]).

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use crate::routing::RoutingProfile;
use crate::topology::Topology;

pub type Span = Range<usize>;

/// Most experts a tensor may stack: llama.cpp's `LLAMA_MAX_EXPERTS` (src/llama-hparams.h of the
/// pinned llama.cpp, where llama-model.cpp asserts `n_expert <= LLAMA_MAX_EXPERTS`). A map
/// naming an expert at or beyond it, or a tensor with more, is an error.
/// Not part of the C API:
/// cbindgen:ignore
pub const MAX_EXPERTS: u32 = 1024;

/// Most NUMA nodes a map may name: Linux's largest MAX_NUMNODES (CONFIG_NODES_SHIFT is at most
/// 10), so node numbers run 0-1023.
/// Not part of the C API:
/// cbindgen:ignore
pub const MAX_NODES: u32 = 1024;

/// Most layers a model may have: llama.cpp's `LLAMA_MAX_LAYERS` (same file; llama-model.cpp
/// asserts `n_layer <= LLAMA_MAX_LAYERS`). Maps may still select higher layer numbers
/// (`blk.0-9999=rows` means "every layer"); a tensor in such a layer is an error.
/// Not part of the C API:
/// cbindgen:ignore
pub const MAX_LAYERS: u32 = 512;

/// The named placement policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Policy {
    /// The planner's choice for decode: `rows` on a multi-node machine, `off` on one node.
    Auto,
    /// Every expert's rows split across nodes; each node computes its share of every expert.
    Rows,
    /// Contiguous ranges of whole experts per node, sized by each node's cores.
    Block,
    /// Whole experts dealt to nodes in turn.
    RoundRobin,
    /// Kernel page interleaving across nodes; computed by llama.cpp's own kernel (a baseline).
    Interleave,
    /// A full copy on every node; each node computes its share from its own copy.
    Mirror,
    /// llama.cpp's own placement and kernels.
    Off,
    /// Whole experts dealt to nodes so that the load a routing profile recorded is even per
    /// core (see [`Balanced`]); `block` without a profile.
    Balanced,
}

impl Policy {
    pub const ALL: [Policy; 8] =
        [Policy::Auto, Policy::Rows, Policy::Block, Policy::RoundRobin, Policy::Interleave, Policy::Mirror, Policy::Off, Policy::Balanced];

    pub fn name(self) -> &'static str {
        match self {
            Policy::Auto => "auto",
            Policy::Rows => "rows",
            Policy::Block => "block",
            Policy::RoundRobin => "round-robin",
            Policy::Interleave => "interleave",
            Policy::Mirror => "mirror",
            Policy::Off => "off",
            Policy::Balanced => "balanced",
        }
    }

    fn from_name(s: &str) -> Option<Policy> {
        Self::ALL.into_iter().find(|p| p.name() == s)
    }
}

/// Which experts a clause covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Experts {
    /// `*`: every expert that no other clause names.
    Rest,
    /// `lo-hi` inclusive (`n` is `n-n`).
    Range(u32, u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clause {
    pub experts: Experts,
    /// One node, or several for a copy on each.
    pub nodes: Vec<u32>,
    pub span: Span,
}

/// What `balanced` asks for besides its nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Balanced {
    /// The routing profile's path as written after `balanced:`, and its span; `None` for a
    /// bare `balanced`, whose profile NUMA_MOE_ROUTING_PROFILE names.
    pub path: Option<(String, Span)>,
    /// Copies of the hottest experts on every node may add at most this share (percent) of
    /// each expert tensor's size; 0: no copies.
    pub copies_percent: u32,
    /// The profile, loaded when the map is set (`crate::config::load_profiles`); `None`
    /// before that, or when none is given: the planner then places as `block`.
    pub profile: Option<Arc<RoutingProfile>>,
    /// Where the loaded profile came from (its path), for messages.
    pub origin: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Policy { policy: Policy, nodes: Option<Vec<u32>>, span: Span },
    Balanced { balanced: Balanced, nodes: Option<Vec<u32>>, span: Span },
    Clauses(Vec<Clause>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Inclusive layer ranges this rule selects; `None` for the default rule.
    pub layers: Option<Vec<(u32, u32)>>,
    pub body: Body,
    pub span: Span,
}

/// A parsed map. Equality ignores nothing: spans are part of it, so compare renders when
/// two maps written differently should be the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertMap {
    pub rules: Vec<Rule>,
    /// The `dense=` rule: every weight matrix outside the routed experts (attention, shared
    /// experts, dense FFN, output head). `None`: `auto`.
    pub dense: Option<DenseRule>,
    pub text: String,
}

/// Where the weight matrices outside the routed experts go (`dense=POLICY[@nodes]`): `auto`
/// (`rows` on a machine with more than one node with memory and CPUs, unless every expert
/// rule is `off`; `off` on one node), `rows`, `mirror`, `interleave` or `off`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenseRule {
    pub policy: Policy,
    pub nodes: Option<Vec<u32>>,
    pub span: Span,
}

/// The policies a `dense=` rule takes (the others place whole experts, which a plain weight
/// matrix does not have).
pub const DENSE_POLICIES: [Policy; 5] = [Policy::Auto, Policy::Rows, Policy::Mirror, Policy::Interleave, Policy::Off];

/// A map that cannot be used, with the text it came from and where the problem is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapError {
    pub text: String,
    pub span: Option<Span>,
    pub message: String,
}

impl MapError {
    fn new(text: &str, span: Option<Span>, message: impl Into<String>) -> Self {
        MapError { text: text.to_string(), span, message: message.into() }
    }
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid expert map \"{}\": {}", self.text, self.message)?;
        if let Some(s) = &self.span {
            if s.end > s.start + 1 {
                write!(f, " (at characters {}-{}: \"{}\")", s.start + 1, s.end, &self.text[s.clone()])?;
            } else {
                write!(f, " (at character {})", s.start + 1)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for MapError {}

/// What a map asks for one expert tensor, after checking it against the tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// Leave the tensor to llama.cpp.
    Off,
    /// A named policy over these nodes (`None`: the planner's default nodes).
    Policy { policy: Policy, nodes: Option<Vec<u32>> },
    /// For every expert, the nodes that hold a copy of it (first: the primary copy).
    Explicit { holders: Vec<Vec<u32>> },
    /// `balanced` over these nodes (`None`: the planner's default nodes), from this profile
    /// (`None`: none given, place as `block`), already checked against the tensor's experts.
    Balanced { nodes: Option<Vec<u32>>, profile: Option<Arc<RoutingProfile>>, copies_percent: u32 },
}

/// One `;`-separated item of a map.
enum Item {
    Rule(Rule),
    Dense(DenseRule),
}

struct Parser<'a> {
    s: &'a str,
    b: &'a [u8],
    pos: usize,
    /// Where the last routing profile path ended, to explain a ';' that was meant in a path.
    path_end: Option<usize>,
}

impl<'a> Parser<'a> {
    fn err<T>(&self, span: Span, msg: impl Into<String>) -> Result<T, MapError> {
        Err(MapError::new(self.s, Some(span), msg))
    }

    fn skip_ws(&mut self) {
        while self.pos < self.b.len() && self.b[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.b.get(self.pos).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn describe_here(&self) -> String {
        match self.b.get(self.pos) {
            None => "the end of the map".to_string(),
            Some(_) => {
                let ch = self.s[self.pos..].chars().next().unwrap_or('?');
                format!("'{ch}'")
            }
        }
    }

    fn here(&self) -> Span {
        let len = self.s[self.pos.min(self.s.len())..].chars().next().map_or(0, |c| c.len_utf8());
        self.pos..self.pos + len.max(if self.pos < self.s.len() { 1 } else { 0 })
    }

    fn int(&mut self, what: &str) -> Result<(u32, Span), MapError> {
        self.skip_ws();
        let start = self.pos;
        while self.pos < self.b.len() && self.b[self.pos].is_ascii_digit() {
            self.pos += 1;
        }
        if start == self.pos {
            let found = self.describe_here();
            return self.err(self.here(), format!("expected {what}, found {found}"));
        }
        match self.s[start..self.pos].parse::<u32>() {
            Ok(v) => Ok((v, start..self.pos)),
            Err(_) => self.err(start..self.pos, format!("{what} {} is too large", &self.s[start..self.pos])),
        }
    }

    /// A node number, below [`MAX_NODES`]: so a node list holds at most that many distinct
    /// nodes, and what resolve copies per expert stays small whatever the map's length.
    fn node(&mut self) -> Result<(u32, Span), MapError> {
        let (n, span) = self.int("a node number")?;
        if n >= MAX_NODES {
            return self.err(span, format!("node {n} is beyond the {MAX_NODES} nodes Linux can number (0-{})", MAX_NODES - 1));
        }
        Ok((n, span))
    }

    fn range(&mut self, what: &str) -> Result<((u32, u32), Span), MapError> {
        let (lo, s0) = self.int(what)?;
        if self.eat(b'-') {
            let (hi, s1) = self.int(what)?;
            if hi < lo {
                let noun = what.trim_start_matches("an ").trim_start_matches("a ").trim_end_matches(" number");
                return self.err(s0.start..s1.end, format!("{noun} range {lo}-{hi} runs backwards"));
            }
            Ok(((lo, hi), s0.start..s1.end))
        } else {
            Ok(((lo, lo), s0))
        }
    }

    fn word(&mut self) -> (String, Span) {
        self.skip_ws();
        let start = self.pos;
        while self.pos < self.b.len() && (self.b[self.pos].is_ascii_alphabetic() || self.b[self.pos] == b'-') {
            self.pos += 1;
        }
        (self.s[start..self.pos].to_string(), start..self.pos)
    }

    fn map(&mut self) -> Result<(Vec<Rule>, Option<DenseRule>), MapError> {
        let mut rules = Vec::new();
        let mut dense: Option<DenseRule> = None;
        let mut add = |r: Result<Item, MapError>, p: &Self| -> Result<(), MapError> {
            match r? {
                Item::Rule(r) => rules.push(r),
                Item::Dense(d) if dense.is_some() => return p.err(d.span, "two dense= rules; give one"),
                Item::Dense(d) => dense = Some(d),
            }
            Ok(())
        };
        let first = self.rule();
        add(first, self)?;
        loop {
            match self.peek() {
                None => break,
                Some(b';') => {
                    let after_path = self.path_end == Some(self.pos);
                    self.pos += 1;
                    let next = self.rule().map_err(|mut e| {
                        if after_path {
                            e.message += " (a routing profile path cannot contain ';': the ';' after it ends the rule)";
                        }
                        e
                    });
                    add(next, self)?;
                }
                Some(_) => {
                    let found = self.describe_here();
                    return self.err(self.here(), format!("expected ',' or ';', found {found}"));
                }
            }
        }
        Ok((rules, dense))
    }

    /// `dense=POLICY[@nodes]`, after its "dense=".
    fn dense(&mut self, start: usize) -> Result<DenseRule, MapError> {
        let body = self.body()?;
        let (policy, nodes) = match body {
            Body::Policy { policy, nodes, .. } if DENSE_POLICIES.contains(&policy) => (policy, nodes),
            _ => {
                let names: Vec<&str> = DENSE_POLICIES.iter().map(|p| p.name()).collect();
                return self.err(
                    start..self.pos,
                    format!(
                        "dense= takes {} (weight matrices outside the routed experts have no experts to place whole)",
                        names.join(", ")
                    ),
                );
            }
        };
        Ok(DenseRule { policy, nodes, span: start..self.pos })
    }

    fn rule(&mut self) -> Result<Item, MapError> {
        self.skip_ws();
        let start = self.pos;
        if self.s[self.pos..].starts_with("dense") {
            let save = self.pos;
            self.pos += 5;
            if self.eat(b'=') {
                return Ok(Item::Dense(self.dense(start)?));
            }
            self.pos = save;
        }
        let layers = if self.s[self.pos..].starts_with("blk.") {
            self.pos += 4;
            let mut ranges = vec![self.range("a layer number")?.0];
            while self.eat(b',') {
                ranges.push(self.range("a layer number")?.0);
            }
            if !self.eat(b'=') {
                let found = self.describe_here();
                return self.err(self.here(), format!("expected '=' after the layer list, found {found}"));
            }
            Some(ranges)
        } else {
            None
        };
        let body = self.body()?;
        Ok(Item::Rule(Rule { layers, body, span: start..self.pos }))
    }

    fn body(&mut self) -> Result<Body, MapError> {
        match self.peek() {
            Some(c) if c.is_ascii_alphabetic() => {
                let (w, span) = self.word();
                let Some(policy) = Policy::from_name(&w) else {
                    let names: Vec<&str> = Policy::ALL.iter().map(|p| p.name()).collect();
                    return self.err(span, format!("unknown policy \"{w}\" (policies: {})", names.join(", ")));
                };
                let balanced = if policy == Policy::Balanced { Some(self.balanced()?) } else { None };
                let nodes = if self.eat(b'@') {
                    let mut v = vec![self.node()?];
                    while self.peek() == Some(b',') {
                        self.pos += 1;
                        v.push(self.node()?);
                    }
                    if let Some((n, s)) = first_repeat(&v) {
                        return self.err(s, format!("node {n} is listed twice"));
                    }
                    Some(v.into_iter().map(|(n, _)| n).collect())
                } else {
                    None
                };
                let span = span.start..self.pos;
                Ok(match balanced {
                    Some(balanced) => Body::Balanced { balanced, nodes, span },
                    None => Body::Policy { policy, nodes, span },
                })
            }
            None => {
                let span = self.here();
                let what = if self.pos == 0 { "the expert map is empty" } else { "a rule is empty" };
                self.err(span, format!("{what}: give a policy (e.g. \"rows\") or clauses like \"0-7:0,8-15:1\""))
            }
            Some(_) => {
                let mut clauses = vec![self.clause()?];
                while self.peek() == Some(b',') {
                    self.pos += 1;
                    clauses.push(self.clause()?);
                }
                Ok(Body::Clauses(clauses))
            }
        }
    }

    /// What follows `balanced`: `:path` and `+copies=N%`, each optional, in that order.
    fn balanced(&mut self) -> Result<Balanced, MapError> {
        let mut path = None;
        if self.eat(b':') {
            self.skip_ws();
            let start = self.pos;
            while self.pos < self.b.len() && !matches!(self.b[self.pos], b'@' | b'+' | b';') {
                self.pos += 1;
            }
            // the delimiters are ASCII, so these are character boundaries
            let text = self.s[start..self.pos].trim_end();
            if text.is_empty() {
                let found = self.describe_here();
                return self.err(self.here(), format!("expected a routing profile path after \"balanced:\", found {found}"));
            }
            if let Some(i) = text.find(',') {
                return self.err(
                    start + i..start + i + 1,
                    format!("a routing profile path cannot contain ',' (\"{text}\"): rename the file or give it through a link"),
                );
            }
            self.path_end = Some(self.pos);
            path = Some((text.to_string(), start..start + text.len()));
        }
        let mut copies_percent = 0;
        if self.eat(b'+') {
            let (w, span) = self.word();
            if w != "copies" || !self.eat(b'=') {
                let span = if w.is_empty() { self.here() } else { span };
                let hint = if path.is_some() { " (a routing profile path cannot contain '+')" } else { "" };
                return self.err(span, format!("expected \"copies=N%\" after '+'{hint}"));
            }
            let (n, _) = self.int("a percentage")?;
            if !self.eat(b'%') {
                let found = self.describe_here();
                return self.err(
                    self.here(),
                    format!(
                        "expected '%' after copies={n}, found {found}: the budget is a share of each expert tensor's size, e.g. copies=10%"
                    ),
                );
            }
            copies_percent = n;
        }
        Ok(Balanced { path, copies_percent, profile: None, origin: String::new() })
    }

    fn clause(&mut self) -> Result<Clause, MapError> {
        self.skip_ws();
        let start = self.pos;
        let experts = if self.eat(b'*') {
            Experts::Rest
        } else {
            let ((lo, hi), span) = self.range("an expert number")?;
            if hi >= MAX_EXPERTS {
                return self
                    .err(span, format!("expert {hi} is beyond the {MAX_EXPERTS} experts llama.cpp supports (0-{})", MAX_EXPERTS - 1));
            }
            Experts::Range(lo, hi)
        };
        if !self.eat(b':') {
            let found = self.describe_here();
            return self.err(self.here(), format!("expected ':' and a node after the experts, found {found}"));
        }
        let mut nodes = vec![self.node()?];
        while self.eat(b'+') {
            nodes.push(self.node()?);
        }
        if let Some((n, s)) = first_repeat(&nodes) {
            return self.err(s, format!("node {n} is listed twice for the same experts"));
        }
        Ok(Clause { experts, nodes: nodes.into_iter().map(|(n, _)| n).collect(), span: start..self.pos })
    }
}

impl ExpertMap {
    /// Parses a map; the error names the first problem and where it is.
    pub fn parse(text: &str) -> Result<Self, MapError> {
        let mut p = Parser { s: text, b: text.as_bytes(), pos: 0, path_end: None };
        if text.trim().is_empty() {
            return Err(MapError::new(
                text,
                None,
                "the expert map is empty: give a policy (e.g. \"rows\") or clauses like \"0-7:0,8-15:1\"",
            ));
        }
        let (mut rules, dense) = p.map()?;
        if rules.is_empty() {
            // only a dense= rule: the experts keep the default
            rules.push(Rule { layers: None, body: Body::Policy { policy: Policy::Auto, nodes: None, span: 0..0 }, span: 0..0 });
        }
        let map = ExpertMap { rules, dense, text: text.to_string() };
        map.check_rules()?;
        Ok(map)
    }

    /// A map holding one policy for every layer.
    pub fn policy(policy: Policy) -> Self {
        Self::parse(policy.name()).expect("policy names parse")
    }

    fn err(&self, span: Option<Span>, msg: impl Into<String>) -> MapError {
        MapError::new(&self.text, span, msg)
    }

    /// Checks that hold whatever the tensor: one default rule, no layer selected by two rules,
    /// no expert named by two clauses of a rule, at most one `*` per rule. Overlaps are found by
    /// sorting the ranges and sweeping them, so the cost follows the map's length, never the
    /// numbers in it (`blk.0-4294967290` is one range, not four billion layers).
    fn check_rules(&self) -> Result<(), MapError> {
        if let Some(r) = self.rules.iter().filter(|r| r.layers.is_none()).nth(1) {
            return Err(self.err(Some(r.span.clone()), "two rules apply to all layers; give layer selections like \"blk.0-3=\""));
        }
        let mut layers: Vec<(u32, u32, usize)> =
            self.rules.iter().enumerate().flat_map(|(i, r)| r.layers.iter().flatten().map(move |&(lo, hi)| (lo, hi, i))).collect();
        layers.sort_unstable();
        // The highest end seen so far and its rule, and the highest end of any other rule: a
        // range overlaps an earlier one of another rule exactly when it starts at or below that
        // rule's highest end. Ranges of the same rule may overlap.
        let mut top: Option<(u32, usize)> = None;
        let mut other: Option<(u32, usize)> = None;
        for &(lo, hi, r) in &layers {
            let rival = match top {
                Some((_, t)) if t == r => other,
                _ => top,
            };
            if let Some((_, o)) = rival.filter(|&(end, _)| lo <= end) {
                let later = &self.rules[r.max(o)];
                return Err(self.err(Some(later.span.clone()), format!("layer {lo} is selected by two rules")));
            }
            match top {
                Some((end, t)) if t == r => top = Some((end.max(hi), r)),
                Some((end, _)) if hi > end => {
                    other = top;
                    top = Some((hi, r));
                }
                Some(_) => {
                    if other.is_none_or(|(end, _)| hi > end) {
                        other = Some((hi, r));
                    }
                }
                None => top = Some((hi, r)),
            }
        }
        for r in &self.rules {
            let Body::Clauses(cl) = &r.body else { continue };
            let rest: Vec<&Clause> = cl.iter().filter(|c| c.experts == Experts::Rest).collect();
            if rest.len() > 1 {
                return Err(self.err(Some(rest[1].span.clone()), "more than one '*' clause in a rule"));
            }
            let mut ranges: Vec<(u32, u32, usize)> = cl
                .iter()
                .enumerate()
                .filter_map(|(i, c)| match c.experts {
                    Experts::Range(lo, hi) => Some((lo, hi, i)),
                    Experts::Rest => None,
                })
                .collect();
            ranges.sort_unstable();
            let mut top: Option<(u32, usize)> = None;
            for &(lo, hi, i) in &ranges {
                if let Some((_, t)) = top.filter(|&(end, _)| lo <= end) {
                    let (first, second) = (&cl[i.min(t)], &cl[i.max(t)]);
                    return Err(self.err(
                        Some(second.span.clone()),
                        format!(
                            "expert {lo} is mapped twice, by \"{}\" and by \"{}\"",
                            &self.text[first.span.clone()],
                            &self.text[second.span.clone()]
                        ),
                    ));
                }
                if top.is_none_or(|(end, _)| hi > end) {
                    top = Some((hi, i));
                }
            }
        }
        Ok(())
    }

    /// The canonical text of this map; `parse(render(m))` renders the same.
    pub fn render(&self) -> String {
        self.rules
            .iter()
            .map(|r| {
                let layers = r
                    .layers
                    .as_ref()
                    .map(|ls| format!("blk.{}=", ls.iter().map(|&(a, b)| render_range(a, b)).collect::<Vec<_>>().join(",")))
                    .unwrap_or_default();
                let body = match &r.body {
                    Body::Policy { policy, nodes, .. } => render_policy(*policy, nodes),
                    Body::Balanced { balanced: b, nodes, .. } => {
                        let mut s = Policy::Balanced.name().to_string();
                        if let Some((path, _)) = &b.path {
                            s += &format!(":{path}");
                        }
                        if b.copies_percent > 0 {
                            s += &format!("+copies={}%", b.copies_percent);
                        }
                        if let Some(n) = nodes {
                            s += &format!("@{}", join(n, ","));
                        }
                        s
                    }
                    Body::Clauses(cl) => cl
                        .iter()
                        .map(|c| {
                            let e = match c.experts {
                                Experts::Rest => "*".to_string(),
                                Experts::Range(a, b) => render_range(a, b),
                            };
                            format!("{e}:{}", join(&c.nodes, "+"))
                        })
                        .collect::<Vec<_>>()
                        .join(","),
                };
                layers + &body
            })
            .chain(self.dense.iter().map(|d| format!("dense={}", render_policy(d.policy, &d.nodes))))
            .collect::<Vec<_>>()
            .join(";")
    }

    /// What the map asks for the weight matrices outside the routed experts: `Off`, or a
    /// policy (`Auto`: the planner's choice, `rows` on more than one node) over its nodes.
    /// Without a `dense=` rule, `auto` unless every expert rule is `off` (a map of "off" means
    /// llama.cpp's own placement for everything).
    pub fn resolve_dense(&self) -> Resolved {
        match &self.dense {
            Some(DenseRule { policy: Policy::Off, .. }) => Resolved::Off,
            Some(d) => Resolved::Policy { policy: d.policy, nodes: d.nodes.clone() },
            None if self.rules.iter().all(|r| matches!(r.body, Body::Policy { policy: Policy::Off, .. })) => Resolved::Off,
            None => Resolved::Policy { policy: Policy::Auto, nodes: None },
        }
    }

    /// Every node the map names, with the span naming it.
    fn named_nodes(&self) -> Vec<(u32, Span)> {
        let mut out = Vec::new();
        for r in &self.rules {
            match &r.body {
                Body::Policy { nodes: Some(n), span, .. } | Body::Balanced { nodes: Some(n), span, .. } => {
                    out.extend(n.iter().map(|&n| (n, span.clone())))
                }
                Body::Policy { .. } | Body::Balanced { .. } => {}
                Body::Clauses(cl) => {
                    for c in cl {
                        out.extend(c.nodes.iter().map(|&n| (n, c.span.clone())));
                    }
                }
            }
        }
        if let Some(DenseRule { nodes: Some(n), span, .. }) = &self.dense {
            out.extend(n.iter().map(|&n| (n, span.clone())));
        }
        out
    }

    /// Checks every node the map names against the machine: it exists, the process may
    /// allocate there, and it has memory.
    pub fn check_nodes(&self, topo: &Topology) -> Result<(), MapError> {
        let ids = topo.node_ids();
        for (n, span) in self.named_nodes() {
            let Some(node) = topo.node(n) else {
                return Err(self.err(Some(span), format!("node {n} does not exist (nodes on this machine: {})", join(&ids, ", "))));
            };
            if !node.has_memory() {
                return Err(self.err(Some(span), format!("node {n} has no memory, so no expert can be placed on it")));
            }
            if !node.mem_allowed {
                return Err(self.err(Some(span), format!("node {n} is not allowed for this process (cpuset or numactl --membind)")));
            }
        }
        Ok(())
    }

    /// The rule that governs `layer` (`None` for tensors outside any block).
    pub fn rule_for(&self, layer: Option<u32>) -> Option<&Rule> {
        if let Some(l) = layer {
            if let Some(r) = self.rules.iter().find(|r| r.layers.as_ref().is_some_and(|ls| ls.iter().any(|&(a, b)| (a..=b).contains(&l)))) {
                return Some(r);
            }
        }
        self.rules.iter().find(|r| r.layers.is_none())
    }

    /// What the map asks for one expert tensor of `n_expert` experts. `tensor` names it in
    /// errors (more experts than llama.cpp supports, an expert beyond the model, mapped twice,
    /// or not at all). Allocates per expert, so `n_expert` is bounded by [`MAX_EXPERTS`] first.
    pub fn resolve(&self, layer: Option<u32>, n_expert: u32, tensor: &str) -> Result<Resolved, MapError> {
        check_expert_count(n_expert, tensor).map_err(|m| self.err(None, m))?;
        match self.rule_for(layer) {
            Some(rule) => self.resolve_rule(rule, n_expert, tensor),
            None => Ok(Resolved::Off),
        }
    }

    /// Checks every rule against a model whose expert tensors have `n_expert` experts (what
    /// `numa-moe check-map --experts N` and `numa_moe_map_check` ask).
    pub fn check_experts(&self, n_expert: u32) -> Result<(), MapError> {
        check_expert_count(n_expert, "the model").map_err(|m| self.err(None, m))?;
        for r in &self.rules {
            self.resolve_rule(r, n_expert, "the model")?;
        }
        Ok(())
    }

    fn resolve_rule(&self, rule: &Rule, n_expert: u32, tensor: &str) -> Result<Resolved, MapError> {
        match &rule.body {
            Body::Policy { policy: Policy::Off, .. } => Ok(Resolved::Off),
            Body::Policy { policy, nodes, .. } => Ok(Resolved::Policy { policy: *policy, nodes: nodes.clone() }),
            Body::Balanced { balanced: b, nodes, .. } => {
                if let Some(p) = &b.profile {
                    p.check_model(&b.origin, n_expert)
                        .map_err(|e| self.err(b.path.as_ref().map(|(_, s)| s.clone()), format!("{} (checking {tensor})", e.message)))?;
                }
                Ok(Resolved::Balanced { nodes: nodes.clone(), profile: b.profile.clone(), copies_percent: b.copies_percent })
            }
            Body::Clauses(clauses) => {
                let mut holders: Vec<Option<(usize, Vec<u32>)>> = vec![None; n_expert as usize];
                for (ci, c) in clauses.iter().enumerate() {
                    let Experts::Range(lo, hi) = c.experts else { continue };
                    if hi >= n_expert {
                        return Err(self.err(
                            Some(c.span.clone()),
                            format!(
                                "expert {} is beyond the model: {tensor} has {n_expert} experts (0-{})",
                                lo.max(n_expert),
                                n_expert.saturating_sub(1)
                            ),
                        ));
                    }
                    for e in lo..=hi {
                        if let Some((prev, _)) = &holders[e as usize] {
                            let p = &clauses[*prev];
                            return Err(self.err(
                                Some(c.span.clone()),
                                format!(
                                    "expert {e} is mapped twice, by \"{}\" and by \"{}\"",
                                    &self.text[p.span.clone()],
                                    &self.text[c.span.clone()]
                                ),
                            ));
                        }
                        holders[e as usize] = Some((ci, c.nodes.clone()));
                    }
                }
                let rest = clauses.iter().find(|c| c.experts == Experts::Rest);
                let missing: Vec<u32> = (0..n_expert).filter(|&e| holders[e as usize].is_none()).collect();
                if !missing.is_empty() {
                    match rest {
                        Some(r) => {
                            for e in &missing {
                                holders[*e as usize] = Some((0, r.nodes.clone()));
                            }
                        }
                        None => {
                            let (noun, verb) = if missing.len() > 1 { ("experts", "are") } else { ("expert", "is") };
                            return Err(self.err(
                                Some(rule.span.clone()),
                                format!(
                                    "{noun} {} {verb} not mapped ({tensor} has {n_expert} experts); add clauses for them or a default such as \"*:0\"",
                                    crate::topology::render_cpu_list(&missing),
                                ),
                            ));
                        }
                    }
                }
                Ok(Resolved::Explicit { holders: holders.into_iter().map(|h| h.expect("covered").1).collect() })
            }
        }
    }
}

/// `policy` or `policy@n,m`.
fn render_policy(policy: Policy, nodes: &Option<Vec<u32>>) -> String {
    match nodes {
        Some(n) => format!("{}@{}", policy.name(), join(n, ",")),
        None => policy.name().to_string(),
    }
}

fn render_range(a: u32, b: u32) -> String {
    if a == b {
        a.to_string()
    } else {
        format!("{a}-{b}")
    }
}

fn join(v: &[u32], sep: &str) -> String {
    v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(sep)
}

/// `n_expert` if a tensor may have that many experts (1 to [`MAX_EXPERTS`]), else why not.
fn check_expert_count(n_expert: u32, tensor: &str) -> Result<(), String> {
    if n_expert == 0 || n_expert > MAX_EXPERTS {
        return Err(format!("{tensor} has {n_expert} experts; llama.cpp supports 1-{MAX_EXPERTS} (LLAMA_MAX_EXPERTS)"));
    }
    Ok(())
}

/// The first number listed a second time in `v`, with its span (sorts a copy: linear-ish in
/// the list, whatever its length).
fn first_repeat(v: &[(u32, Span)]) -> Option<(u32, Span)> {
    let mut sorted: Vec<(u32, usize)> = v.iter().enumerate().map(|(i, (n, _))| (*n, i)).collect();
    sorted.sort_unstable();
    let second = sorted.windows(2).filter(|w| w[0].0 == w[1].0).map(|w| w[1].1).min()?;
    Some(v[second].clone())
}

/// The layer number of a tensor named like "blk.12.ffn_up_exps.weight".
pub fn layer_of(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("blk.")?;
    rest.split('.').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> ExpertMap {
        ExpertMap::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    fn e(s: &str) -> String {
        ExpertMap::parse(s).unwrap_err().to_string()
    }

    #[test]
    fn dense_rules_parse_render_and_resolve() {
        assert_eq!(p("rows;dense=mirror").render(), "rows;dense=mirror");
        assert_eq!(p("dense = rows@0,1 ; 0-7:0,*:1").render(), "0-7:0,*:1;dense=rows@0,1");
        // a map of only a dense rule keeps the experts' default
        assert_eq!(p("dense=off").render(), "auto;dense=off");
        assert_eq!(p("rows").resolve_dense(), Resolved::Policy { policy: Policy::Auto, nodes: None });
        assert_eq!(p("rows;dense=off").resolve_dense(), Resolved::Off);
        assert_eq!(p("block;dense=mirror@1").resolve_dense(), Resolved::Policy { policy: Policy::Mirror, nodes: Some(vec![1]) });
        // "off" alone means llama.cpp's own placement for every weight
        assert_eq!(p("off").resolve_dense(), Resolved::Off);
        assert_eq!(p("off;dense=rows").resolve_dense(), Resolved::Policy { policy: Policy::Rows, nodes: None });
        // the nodes of a dense rule are checked with the others
        assert_eq!(p("rows;dense=rows@3").named_nodes().last().map(|n| n.0), Some(3));
    }

    #[test]
    fn bad_dense_rules_say_what_is_wrong_and_where() {
        assert_eq!(
            e("rows;dense=block"),
            "invalid expert map \"rows;dense=block\": dense= takes auto, rows, mirror, interleave, off (weight matrices outside the routed experts have no experts to place whole) (at characters 6-16: \"dense=block\")"
        );
        assert!(e("rows;dense=0-3:1").contains("dense= takes auto, rows, mirror, interleave, off"), "{}", e("rows;dense=0-3:1"));
        assert_eq!(
            e("dense=rows;dense=off"),
            "invalid expert map \"dense=rows;dense=off\": two dense= rules; give one (at characters 12-20: \"dense=off\")"
        );
        assert!(e("rows;dense=").contains("dense= takes") || e("rows;dense=").contains("empty"), "{}", e("rows;dense="));
        assert!(e("rows;dense=rowz").contains("unknown policy \"rowz\""));
    }

    #[test]
    fn parses_the_documented_examples() {
        for s in [
            "rows",
            "rows@0,1",
            "0-7:0,8-15:1",
            "3:1,*:0",
            "0-3:0+1,4-7:1",
            "blk.0-2=mirror;blk.3-60=rows",
            "auto",
            "off",
            "interleave@0,1",
            "round-robin",
            "block@1",
            "blk.0,4-5=0-1:0,*:1;rows",
        ] {
            assert_eq!(p(s).render(), s);
        }
    }

    #[test]
    fn whitespace_is_ignored_and_render_is_canonical() {
        assert_eq!(p(" 0 - 7 : 0 , 8-15: 1 ").render(), "0-7:0,8-15:1");
        assert_eq!(p("blk. 0-2 = mirror ; rows").render(), "blk.0-2=mirror;rows");
        assert_eq!(p("5-5:0+1").render(), "5:0+1");
    }

    #[test]
    fn empty_map() {
        assert!(e("").contains("the expert map is empty"));
        assert!(e("   ").contains("the expert map is empty"));
        assert!(e("rows;").contains("a rule is empty"));
    }

    #[test]
    fn malformed_ranges_point_at_the_problem() {
        let m = e("0-7:0,8-:1");
        assert!(m.contains("expected an expert number, found ':'") && m.contains("character 9"), "{m}");
        assert!(e("7-3:0").contains("expert range 7-3 runs backwards"));
        assert!(e("blk.5-2=rows").contains("layer range 5-2 runs backwards"));
        assert!(e("0-7").contains("expected ':' and a node after the experts, found the end of the map"));
        assert!(e("0-7:").contains("expected a node number, found the end of the map"));
        assert!(e("0-7:0 8-15:1").contains("expected ',' or ';', found '8'"));
        assert!(e("0-7:x").contains("expected a node number, found 'x'"));
        assert!(e("99999999999:0").contains("too large"));
    }

    #[test]
    fn unknown_policy_lists_the_known_ones() {
        let m = e("rowz");
        assert!(m.contains("unknown policy \"rowz\"") && m.contains("round-robin"), "{m}");
    }

    #[test]
    fn duplicate_nodes_and_layers() {
        assert!(e("rows@0,0").contains("node 0 is listed twice"));
        assert!(e("0-3:1+1").contains("node 1 is listed twice"));
        assert!(e("blk.0-3=rows;blk.3-5=mirror").contains("layer 3 is selected by two rules"));
        assert!(e("rows;mirror").contains("two rules apply to all layers"));
        assert!(e("*:0,*:1").contains("more than one '*' clause"));
        // overlapping experts are refused whatever the tensor, the later clause quoted
        let err = e("0-7:0,5-9:1,*:0");
        assert!(err.contains("expert 5 is mapped twice, by \"0-7:0\" and by \"5-9:1\" (at characters 7-11"), "{err}");
        let err = e("20-30:1,0-3:0,3:1");
        assert!(err.contains("expert 3 is mapped twice, by \"0-3:0\" and by \"3:1\""), "{err}");
    }

    #[test]
    fn overlaps_are_found_by_interval_not_by_number() {
        // ranges of one rule may overlap; those of two rules may not, wherever they sit
        assert_eq!(p("blk.0-3,2-5=rows").render(), "blk.0-3,2-5=rows");
        assert!(e("blk.0-10,2-20=rows;blk.15-16=off").contains("layer 15 is selected by two rules"));
        assert!(e("blk.15-16=off;blk.0-10,2-20=rows").contains("layer 15 is selected by two rules"));
        assert!(e("blk.0-5=rows;blk.7=off;blk.6,3=mirror").contains("layer 3 is selected by two rules"));
        let far = "blk.4294967291=block;blk.0-4294967290=rows;blk.4294967292-4294967295=off";
        let t0 = std::time::Instant::now();
        let m = p(far);
        assert_eq!(m.resolve(Some(4294967291), 8, "x").unwrap(), Resolved::Policy { policy: Policy::Block, nodes: None });
        assert_eq!(m.resolve(Some(4294967290), 8, "x").unwrap(), Resolved::Policy { policy: Policy::Rows, nodes: None });
        let err = e("blk.4294967291=block;blk.0-4294967291=rows");
        assert!(err.contains("layer 4294967291 is selected by two rules") && err.contains("\"blk.0-4294967291=rows\""), "{err}");
        assert!(t0.elapsed().as_millis() < 100, "{:?}", t0.elapsed());
        // every node Linux can number, listed once each, and one listed twice
        let nodes: Vec<String> = (0..1024).map(|n| n.to_string()).collect();
        assert_eq!(p(&format!("rows@{}", nodes.join(","))).render(), format!("rows@{}", nodes.join(",")));
        let err = e(&format!("0:{}+7", nodes.join("+")));
        assert!(err.contains("node 7 is listed twice"), "{err}");
        let err = e("0-7:0,8-15:1024");
        assert!(err.contains("node 1024 is beyond the 1024 nodes Linux can number (0-1023) (at characters 12-15"), "{err}");
        assert!(e("rows@0,4294967295").contains("node 4294967295 is beyond the 1024 nodes"));
    }

    #[test]
    fn expert_numbers_and_counts_are_bounded() {
        let err = e("0-7:0,8-1024:1");
        assert!(
            err.contains("expert 1024 is beyond the 1024 experts llama.cpp supports (0-1023) (at characters 7-12: \"8-1024\")"),
            "{err}"
        );
        assert!(p("1023:0,*:1").resolve(Some(0), 1024, "x").is_ok());
        let err = p("*:0").resolve(Some(0), 1025, "blk.0.ffn_up_exps.weight").unwrap_err().to_string();
        assert!(err.contains("blk.0.ffn_up_exps.weight has 1025 experts; llama.cpp supports 1-1024"), "{err}");
        assert!(p("rows").check_experts(u32::MAX).unwrap_err().to_string().contains("the model has 4294967295 experts"));
        assert!(p("rows").check_experts(0).is_err());
        let err = p("blk.0-3=0-3:0;blk.4-7=0-2:1").check_experts(4).unwrap_err().to_string();
        assert!(err.contains("expert 3 is not mapped (the model has 4 experts)"), "{err}");
    }

    #[test]
    fn nodes_are_checked_against_the_machine() {
        let topo = Topology::uniform(2, 2, 1);
        let err = p("0-7:0,8-15:5").check_nodes(&topo).unwrap_err().to_string();
        assert!(err.contains("node 5 does not exist (nodes on this machine: 0, 1)"), "{err}");
        assert!(err.contains("\"8-15:5\""), "{err}");
        assert!(p("rows@0,3").check_nodes(&topo).unwrap_err().to_string().contains("node 3 does not exist"));
        assert!(p("rows@0,1").check_nodes(&topo).is_ok());

        let mut nodes = topo.nodes().to_vec();
        nodes[1].total_bytes = 0;
        let memless = Topology::from_parts(nodes.clone(), None, crate::topology::Source::Manual).unwrap();
        assert!(p("0-3:1,*:0").check_nodes(&memless).unwrap_err().to_string().contains("node 1 has no memory"));
        nodes[1].total_bytes = 1 << 30;
        nodes[1].mem_allowed = false;
        let fenced = Topology::from_parts(nodes, None, crate::topology::Source::Manual).unwrap();
        assert!(p("rows@1").check_nodes(&fenced).unwrap_err().to_string().contains("node 1 is not allowed for this process"));
    }

    #[test]
    fn experts_are_checked_against_each_tensor() {
        let t = "blk.0.ffn_up_exps.weight";
        let err = p("0-7:0,8-130:1").resolve(Some(0), 128, t).unwrap_err().to_string();
        assert!(err.contains("expert 128 is beyond the model: blk.0.ffn_up_exps.weight has 128 experts (0-127)"), "{err}");
        let err = p("0-7:0").resolve(Some(0), 16, t).unwrap_err().to_string();
        assert!(err.contains("experts 8-15 are not mapped"), "{err}");
        let err = p("0-14:0").resolve(Some(0), 16, t).unwrap_err().to_string();
        assert!(err.contains("expert 15 is not mapped"), "{err}");
        assert_eq!(
            p("0-1:0,2:1+0,*:1").resolve(Some(0), 4, t).unwrap(),
            Resolved::Explicit { holders: vec![vec![0], vec![0], vec![1, 0], vec![1]] }
        );
    }

    #[test]
    fn balanced_takes_a_profile_path_a_copy_budget_and_nodes() {
        for s in [
            "balanced",
            "balanced:p.json",
            "balanced@0,1",
            "balanced:/tmp/run 1/p.json@1,0",
            "balanced+copies=5%",
            "balanced:p.json+copies=10%@0,1",
            "blk.0-2=mirror;blk.3-60=balanced:p.json;rows",
        ] {
            assert_eq!(p(s).render(), s);
        }
        // spaces around the path are not part of it; a 0% budget is no budget
        assert_eq!(p("blk.3 = balanced : p.json  @ 0 ; rows").render(), "blk.3=balanced:p.json@0;rows");
        assert_eq!(p("balanced:p.json+copies=0%").render(), "balanced:p.json");
        let Body::Balanced { balanced: b, nodes, .. } = &p("balanced: q.json +copies=7%@1").rules[0].body else { panic!() };
        assert_eq!((b.path.as_ref().unwrap().0.as_str(), b.path.as_ref().unwrap().1.clone()), ("q.json", 10..16));
        assert_eq!((b.copies_percent, nodes.clone(), b.profile.clone()), (7, Some(vec![1]), None));
        assert!(p("balanced:p.json@5").check_nodes(&Topology::uniform(2, 2, 1)).unwrap_err().to_string().contains("node 5 does not exist"));
        // not loaded yet (config does that): resolves to no profile, the planner's `block`
        assert_eq!(
            p("balanced:p.json").resolve(Some(0), 8, "x").unwrap(),
            Resolved::Balanced { nodes: None, profile: None, copies_percent: 0 }
        );
    }

    #[test]
    fn balanced_syntax_errors_point_at_the_problem() {
        let m = e("balanced:");
        assert!(m.contains("expected a routing profile path after \"balanced:\", found the end of the map"), "{m}");
        let m = e("balanced: @0");
        assert!(m.contains("expected a routing profile path after \"balanced:\", found '@' (at character 11)"), "{m}");
        let m = e("balanced:a,b.json");
        assert!(m.contains("a routing profile path cannot contain ',' (\"a,b.json\")") && m.contains("(at character 11)"), "{m}");
        let m = e("balanced:dir;x/p.json");
        assert!(m.contains("unknown policy \"x\""), "{m}");
        assert!(m.ends_with("(a routing profile path cannot contain ';': the ';' after it ends the rule) (at character 14)"), "{m}");
        let m = e("balanced:c++/p.json");
        assert!(m.contains("expected \"copies=N%\" after '+' (a routing profile path cannot contain '+')"), "{m}");
        let m = e("balanced:p.json+copies=4GiB");
        assert!(m.contains("expected '%' after copies=4, found 'G'") && m.contains("e.g. copies=10%") && m.contains("character 25"), "{m}");
        assert!(e("balanced+copy=4%").contains("expected \"copies=N%\" after '+' (at characters 10-13: \"copy\")"));
        assert!(e("balanced+copies=99999999999%").contains("a percentage 99999999999 is too large"));
        assert!(e("balanced:p.json@0,0").contains("node 0 is listed twice"));
        assert!(e("balancd:p.json").contains("unknown policy \"balancd\""));
        // a ';' right after a policy, not a path, gets no path hint
        assert!(!e("rows;dir/x").contains("routing profile"));
    }

    #[test]
    fn layer_rules_select_by_block_number() {
        let m = p("blk.0-2=mirror;blk.5=off;rows");
        assert_eq!(m.resolve(Some(1), 8, "x").unwrap(), Resolved::Policy { policy: Policy::Mirror, nodes: None });
        assert_eq!(m.resolve(Some(5), 8, "x").unwrap(), Resolved::Off);
        assert_eq!(m.resolve(Some(9), 8, "x").unwrap(), Resolved::Policy { policy: Policy::Rows, nodes: None });
        assert_eq!(p("blk.0-2=rows").resolve(Some(3), 8, "x").unwrap(), Resolved::Off);
        assert_eq!(layer_of("blk.12.ffn_up_exps.weight"), Some(12));
        assert_eq!(layer_of("token_embd.weight"), None);
    }
}

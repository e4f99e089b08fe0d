//! Rules -> decision: which service account (or passthrough, or deny) a caller gets.
//!
//! Rules are tried in file order and the first one whose match keys all match wins; a rule with
//! no match keys matches everyone. No match is a denial: an unmapped caller never silently gets
//! the VM's own identity (design invariant 2).
//!
//! `unit`, `slice`, `container` and `pod` are read from cgroup names, and whoever owns a delegated
//! cgroup subtree (a user's systemd manager, rootless podman) names the cgroups inside it. A rule
//! meant for a system service should therefore also pin `cgroup` (or `uid`), e.g.
//! `cgroup = "/system.slice/app.service"` rather than `unit = "app.service"` alone.

use std::fmt;
use std::sync::Arc;

use globset::{Glob, GlobBuilder, GlobMatcher, GlobSet, GlobSetBuilder};

use crate::config::{Action, RuleConfig};
use crate::identity::Identity;

/// A rule the policy cannot use. Each message names the rule (number, name and line) and the fix.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// `service_account` and `action` are both set.
    #[error(
        "{rule}: sets both service_account and action; keep one: service_account gives the \
         workload that identity, action = \"passthrough\" or \"deny\" does the other"
    )]
    BothOutcomes { rule: String, line: usize },
    /// Neither `service_account` nor `action` is set.
    #[error(
        "{rule}: sets neither service_account nor action; add service_account = \
         \"NAME@PROJECT.iam.gserviceaccount.com\", action = \"passthrough\" or action = \"deny\""
    )]
    NoOutcome { rule: String, line: usize },
    /// `service_account` is not an email address.
    #[error(
        "{rule}: service_account {email:?} is not a service-account email; write the full \
         address, e.g. \"app@my-project.iam.gserviceaccount.com\""
    )]
    BadEmail {
        rule: String,
        line: usize,
        email: String,
    },
    /// A glob does not compile.
    #[error(
        "{rule}: {key} = {glob:?} is not a valid glob ({error}); `*` matches within one path \
         component, `**` across components, `?` one character, `[ab]` a class, `{{a,b}}` \
         alternatives"
    )]
    Glob {
        rule: String,
        line: usize,
        key: &'static str,
        glob: String,
        error: globset::Error,
    },
    /// A `cgroup` glob that cannot match any cgroup path.
    #[error(
        "{rule}: cgroup = {glob:?} does not start with '/'; cgroup paths are relative to the \
         cgroup2 mount and start with '/', e.g. \"/system.slice/app.service\" or \"/user.slice/**\""
    )]
    RelativeCgroup {
        rule: String,
        line: usize,
        glob: String,
    },
    /// `scopes = []`: no access token could ever be minted.
    #[error(
        "{rule}: scopes = [] allows no access token (each needs a scope); list the scopes the \
         workload may ask for, or leave scopes out to allow any"
    )]
    NoScopes { rule: String, line: usize },
    /// A `conceal` entry that names no metadata path.
    #[error(
        "{rule}: conceal entry {path:?} names no metadata path; write a path under \
         /computeMetadata/v1/, e.g. \"instance/attributes/ssh-keys\""
    )]
    EmptyConceal {
        rule: String,
        line: usize,
        path: String,
    },
    /// `scopes`, `audiences` or `conceal` on a rule that grants no service account.
    #[error(
        "{rule}: {key} only applies to a rule with service_account, and this rule has \
         action = \"{action}\"; remove {key} from it"
    )]
    LimitWithoutGrant {
        rule: String,
        line: usize,
        key: &'static str,
        action: Action,
    },
}

impl PolicyError {
    /// The 1-based line of the offending rule's `[[rule]]` header.
    pub fn line(&self) -> usize {
        match self {
            Self::BothOutcomes { line, .. }
            | Self::NoOutcome { line, .. }
            | Self::BadEmail { line, .. }
            | Self::Glob { line, .. }
            | Self::RelativeCgroup { line, .. }
            | Self::NoScopes { line, .. }
            | Self::EmptyConceal { line, .. }
            | Self::LimitWithoutGrant { line, .. } => *line,
        }
    }
}

/// The compiled rules, in file order.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: Vec<Arc<Rule>>,
}

/// What the policy decided for one caller.
#[derive(Debug, Clone)]
pub struct Decision {
    /// The rule that matched; `None` when none did.
    pub rule: Option<Arc<Rule>>,
    pub outcome: Outcome,
}

/// What a matching rule does.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Answer as this service account.
    ServiceAccount(Arc<Grant>),
    /// Forward to the real metadata server unchanged: the VM's own identity.
    Passthrough,
    /// Refuse the request.
    Deny,
}

/// A service account a rule grants, with its limits.
#[derive(Debug, Clone)]
pub struct Grant {
    pub email: String,
    /// `None`: any scope may be asked for.
    pub scopes: Option<Vec<String>>,
    /// `None`: any audience. Globs where `*` stays within one '/'-separated part, so
    /// `https://*.a.run.app` cannot match `https://evil.example/x.a.run.app`.
    pub audiences: Option<GlobSet>,
    /// Metadata paths relative to `/computeMetadata/v1/`, no leading or trailing slash, e.g.
    /// `instance/attributes/ssh-keys`.
    pub conceal: Vec<String>,
    /// The granting rule's label, e.g. `rule 2 "app" (line 14)`.
    pub rule_label: String,
}

/// One compiled rule.
#[derive(Debug)]
pub struct Rule {
    /// 1-based position in the file.
    index: usize,
    name: Option<String>,
    line: usize,
    uid: Option<u32>,
    user: Option<String>,
    gid: Option<u32>,
    group: Option<String>,
    cgroup: Option<Pattern>,
    unit: Option<Pattern>,
    slice: Option<Pattern>,
    container: Option<Pattern>,
    pod: Option<Pattern>,
    outcome: Outcome,
    /// The audience globs as written, for `Display` (the grant holds them compiled).
    audiences: Option<Vec<String>>,
}

/// A glob with its source text, kept for `Display`.
#[derive(Debug)]
struct Pattern {
    glob: String,
    matcher: GlobMatcher,
}

impl Pattern {
    fn is_match(&self, value: &str) -> bool {
        // `GlobMatcher::is_match` borrows a `&str` on Unix: no allocation per request.
        self.matcher.is_match(value)
    }
}

/// Every glob in a rule is compiled with `literal_separator`, so `*` never crosses a '/'
/// (only `**` does); for unit, slice, container and pod values, which have no '/', it changes
/// nothing.
fn glob(pattern: &str) -> Result<Glob, globset::Error> {
    GlobBuilder::new(pattern).literal_separator(true).build()
}

/// `rule 2 "app" (line 14)`, or `rule 2 (line 14)` for a rule without a name.
fn label(index: usize, name: Option<&str>, line: usize) -> String {
    match name {
        Some(name) => format!("rule {index} {name:?} (line {line})"),
        None => format!("rule {index} (line {line})"),
    }
}

/// `"/instance/attributes/ssh-keys/"`, `"computeMetadata/v1/instance/attributes/ssh-keys"` and
/// `"instance/attributes/ssh-keys"` all name the same path.
fn normalize_conceal(path: &str) -> &str {
    let path = path.trim_start_matches('/');
    let path = path.strip_prefix("computeMetadata/v1/").unwrap_or(path);
    path.trim_end_matches('/')
}

impl Policy {
    /// Compiles and checks the rules: one outcome per rule, service-account emails, globs,
    /// and limits only where a service account is granted.
    pub fn new(rules: &[RuleConfig]) -> Result<Policy, PolicyError> {
        let rules = rules
            .iter()
            .enumerate()
            .map(|(i, rule)| Rule::new(i + 1, rule).map(Arc::new))
            .collect::<Result<_, _>>()?;
        Ok(Policy { rules })
    }

    /// First match wins; no match is `Deny` with `rule: None`. Allocation-free apart from the
    /// globs' own matching.
    pub fn decide(&self, id: &Identity) -> Decision {
        match self.rules.iter().find(|rule| rule.matches(id)) {
            Some(rule) => Decision {
                rule: Some(Arc::clone(rule)),
                outcome: rule.outcome.clone(),
            },
            None => Decision {
                rule: None,
                outcome: Outcome::Deny,
            },
        }
    }
}

impl Rule {
    fn new(index: usize, config: &RuleConfig) -> Result<Rule, PolicyError> {
        let RuleConfig {
            name,
            uid,
            user,
            gid,
            group,
            cgroup,
            unit,
            slice,
            container,
            pod,
            service_account,
            action,
            scopes,
            audiences,
            conceal,
            line,
        } = config;
        let line = *line;
        let rule = || label(index, name.as_deref(), line);
        let pattern = |key: &'static str, value: &Option<String>| {
            value
                .as_deref()
                .map(|text| {
                    glob(text)
                        .map(|g| Pattern {
                            glob: text.to_owned(),
                            matcher: g.compile_matcher(),
                        })
                        .map_err(|error| PolicyError::Glob {
                            rule: rule(),
                            line,
                            key,
                            glob: text.to_owned(),
                            error,
                        })
                })
                .transpose()
        };
        if let Some(text) = cgroup.as_deref().filter(|c| !c.starts_with('/')) {
            return Err(PolicyError::RelativeCgroup {
                rule: rule(),
                line,
                glob: text.to_owned(),
            });
        }
        let outcome = match (service_account, action) {
            (Some(_), Some(_)) => return Err(PolicyError::BothOutcomes { rule: rule(), line }),
            (None, None) => return Err(PolicyError::NoOutcome { rule: rule(), line }),
            (None, Some(action)) => {
                let set = [
                    ("scopes", scopes.is_some()),
                    ("audiences", audiences.is_some()),
                    ("conceal", !conceal.is_empty()),
                ];
                if let Some((key, _)) = set.iter().find(|(_, present)| *present) {
                    return Err(PolicyError::LimitWithoutGrant {
                        rule: rule(),
                        line,
                        key,
                        action: *action,
                    });
                }
                match action {
                    Action::Passthrough => Outcome::Passthrough,
                    Action::Deny => Outcome::Deny,
                }
            }
            (Some(email), None) => {
                let email = email.trim();
                let valid = email
                    .split_once('@')
                    .is_some_and(|(local, domain)| !local.is_empty() && !domain.is_empty());
                if !valid {
                    return Err(PolicyError::BadEmail {
                        rule: rule(),
                        line,
                        email: email.to_owned(),
                    });
                }
                if scopes.as_ref().is_some_and(Vec::is_empty) {
                    return Err(PolicyError::NoScopes { rule: rule(), line });
                }
                let audience_set = match audiences {
                    None => None,
                    Some(list) => {
                        let mut set = GlobSetBuilder::new();
                        for text in list {
                            let g = glob(text).map_err(|error| PolicyError::Glob {
                                rule: rule(),
                                line,
                                key: "audiences",
                                glob: text.clone(),
                                error,
                            })?;
                            set.add(g);
                        }
                        Some(set.build().map_err(|error| PolicyError::Glob {
                            rule: rule(),
                            line,
                            key: "audiences",
                            glob: list.join(", "),
                            error,
                        })?)
                    }
                };
                let conceal = conceal
                    .iter()
                    .map(|path| match normalize_conceal(path) {
                        "" => Err(PolicyError::EmptyConceal {
                            rule: rule(),
                            line,
                            path: path.clone(),
                        }),
                        normal => Ok(normal.to_owned()),
                    })
                    .collect::<Result<_, _>>()?;
                Outcome::ServiceAccount(Arc::new(Grant {
                    email: email.to_owned(),
                    scopes: scopes.clone(),
                    audiences: audience_set,
                    conceal,
                    rule_label: rule(),
                }))
            }
        };
        Ok(Rule {
            index,
            name: name.clone(),
            line,
            uid: *uid,
            user: user.clone(),
            gid: *gid,
            group: group.clone(),
            cgroup: pattern("cgroup", cgroup)?,
            unit: pattern("unit", unit)?,
            slice: pattern("slice", slice)?,
            container: pattern("container", container)?,
            pod: pattern("pod", pod)?,
            outcome,
            audiences: audiences.clone(),
        })
    }

    /// `rule 2 "app" (line 14)`: how logs and messages name this rule.
    pub fn label(&self) -> String {
        label(self.index, self.name.as_deref(), self.line)
    }

    /// Every key present must match; `gid` and `group` also match supplementary groups.
    fn matches(&self, id: &Identity) -> bool {
        let Self {
            uid,
            user,
            gid,
            group,
            cgroup,
            unit,
            slice,
            container,
            pod,
            ..
        } = self;
        let one = |pattern: &Option<Pattern>, value: &Option<String>| {
            pattern
                .as_ref()
                .is_none_or(|p| value.as_deref().is_some_and(|v| p.is_match(v)))
        };
        uid.is_none_or(|uid| uid == id.uid)
            && user
                .as_deref()
                .is_none_or(|user| id.user.as_deref() == Some(user))
            && gid.is_none_or(|gid| gid == id.gid || id.groups.contains(&gid))
            && group.as_deref().is_none_or(|group| {
                id.group.as_deref() == Some(group) || id.group_names.iter().any(|n| n == group)
            })
            && one(cgroup, &id.cgroup)
            && one(unit, &id.unit)
            && slice
                .as_ref()
                .is_none_or(|p| id.slices.iter().any(|s| p.is_match(s)))
            && one(container, &id.container)
            && one(pod, &id.pod)
    }

    /// A rule without match keys: it matches every caller.
    fn matches_everyone(&self) -> bool {
        let Self {
            uid,
            user,
            gid,
            group,
            cgroup,
            unit,
            slice,
            container,
            pod,
            ..
        } = self;
        uid.is_none()
            && user.is_none()
            && gid.is_none()
            && group.is_none()
            && cgroup.is_none()
            && unit.is_none()
            && slice.is_none()
            && container.is_none()
            && pod.is_none()
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::ServiceAccount(grant) => write!(f, "service_account {}", grant.email),
            Outcome::Passthrough => f.write_str("passthrough"),
            Outcome::Deny => f.write_str("deny"),
        }
    }
}

/// One line: label, match keys, outcome, limits. E.g.
/// `rule 1 "app" (line 3): uid=1000 cgroup="/system.slice/app.service" -> service_account
/// app@p.iam.gserviceaccount.com scopes=any audiences=any`.
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            uid,
            user,
            gid,
            group,
            cgroup,
            unit,
            slice,
            container,
            pod,
            outcome,
            ..
        } = self;
        write!(f, "{}:", self.label())?;
        if self.matches_everyone() {
            f.write_str(" everyone")?;
        }
        if let Some(uid) = uid {
            write!(f, " uid={uid}")?;
        }
        if let Some(user) = user {
            write!(f, " user={user:?}")?;
        }
        if let Some(gid) = gid {
            write!(f, " gid={gid}")?;
        }
        if let Some(group) = group {
            write!(f, " group={group:?}")?;
        }
        for (key, pattern) in [
            ("cgroup", cgroup),
            ("unit", unit),
            ("slice", slice),
            ("container", container),
            ("pod", pod),
        ] {
            if let Some(Pattern { glob, .. }) = pattern {
                write!(f, " {key}={glob:?}")?;
            }
        }
        write!(f, " -> {outcome}")?;
        if let Outcome::ServiceAccount(grant) = outcome {
            match &grant.scopes {
                Some(scopes) => write!(f, " scopes={scopes:?}")?,
                None => f.write_str(" scopes=any")?,
            }
            match &self.audiences {
                Some(audiences) => write!(f, " audiences={audiences:?}")?,
                None => f.write_str(" audiences=any")?,
            }
            if !grant.conceal.is_empty() {
                write!(f, " conceal={:?}", grant.conceal)?;
            }
        }
        Ok(())
    }
}

/// For `mds-agent check`: one line per rule, as understood, then what happens to a caller no
/// rule matches. Rules after one that matches everyone are marked as never reached.
impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut catch_all: Option<&Rule> = None;
        for rule in &self.rules {
            write!(f, "{rule}")?;
            match catch_all {
                Some(first) => writeln!(f, " (never reached: {} matches everyone)", first.label())?,
                None => writeln!(f)?,
            }
            if catch_all.is_none() && rule.matches_everyone() {
                catch_all = Some(rule);
            }
        }
        if catch_all.is_none() {
            writeln!(f, "no rule matches -> deny")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(line: usize) -> RuleConfig {
        RuleConfig {
            line,
            ..RuleConfig::default()
        }
    }

    fn sa(email: &str) -> RuleConfig {
        RuleConfig {
            service_account: Some(email.into()),
            ..rule(1)
        }
    }

    fn act(action: Action) -> RuleConfig {
        RuleConfig {
            action: Some(action),
            ..rule(1)
        }
    }

    fn policy(rules: Vec<RuleConfig>) -> Policy {
        let rules: Vec<RuleConfig> = rules
            .into_iter()
            .enumerate()
            .map(|(i, r)| RuleConfig {
                line: 10 * (i + 1),
                ..r
            })
            .collect();
        Policy::new(&rules).unwrap_or_else(|e| panic!("policy should compile: {e}"))
    }

    fn identity(uid: u32, cgroup: &str) -> Identity {
        Identity {
            uid,
            gid: uid,
            groups: vec![uid],
            cgroup: Some(cgroup.to_owned()),
            ..Identity::default()
        }
    }

    /// The email of the granted account, "passthrough", "deny", plus the matching rule's line.
    fn decide(policy: &Policy, id: &Identity) -> (String, Option<usize>) {
        let Decision { rule, outcome } = policy.decide(id);
        let outcome = match outcome {
            Outcome::ServiceAccount(grant) => grant.email.clone(),
            other => other.to_string(),
        };
        (outcome, rule.map(|r| r.line))
    }

    fn error(rules: Vec<RuleConfig>) -> PolicyError {
        match Policy::new(&rules) {
            Ok(p) => panic!("policy should be rejected, got:\n{p}"),
            Err(e) => e,
        }
    }

    #[test]
    fn first_match_wins() {
        let p = policy(vec![
            RuleConfig {
                uid: Some(1000),
                ..sa("first@p.iam.gserviceaccount.com")
            },
            RuleConfig {
                uid: Some(1000),
                ..sa("second@p.iam.gserviceaccount.com")
            },
        ]);
        assert_eq!(
            decide(&p, &identity(1000, "/")),
            ("first@p.iam.gserviceaccount.com".into(), Some(10))
        );
    }

    #[test]
    fn default_rule_matches_everyone_after_specific_rules() {
        let p = policy(vec![
            RuleConfig {
                uid: Some(1000),
                ..sa("alice@p.iam.gserviceaccount.com")
            },
            sa("default@p.iam.gserviceaccount.com"),
        ]);
        assert_eq!(
            decide(&p, &identity(1000, "/")).0,
            "alice@p.iam.gserviceaccount.com"
        );
        assert_eq!(
            decide(&p, &identity(1001, "/")),
            ("default@p.iam.gserviceaccount.com".into(), Some(20))
        );
        assert_eq!(decide(&p, &Identity::default()).1, Some(20));
    }

    #[test]
    fn no_match_denies_without_rule() {
        let p = policy(vec![RuleConfig {
            uid: Some(1000),
            ..act(Action::Passthrough)
        }]);
        let d = p.decide(&identity(1001, "/"));
        assert!(d.rule.is_none());
        assert!(matches!(d.outcome, Outcome::Deny));
        let empty = policy(vec![]);
        assert!(matches!(
            empty.decide(&identity(0, "/")).outcome,
            Outcome::Deny
        ));
    }

    #[test]
    fn passthrough_and_deny() {
        let p = policy(vec![
            RuleConfig {
                uid: Some(0),
                ..act(Action::Passthrough)
            },
            RuleConfig {
                uid: Some(1),
                ..act(Action::Deny)
            },
        ]);
        assert_eq!(
            decide(&p, &identity(0, "/")),
            ("passthrough".into(), Some(10))
        );
        assert_eq!(decide(&p, &identity(1, "/")), ("deny".into(), Some(20)));
    }

    #[test]
    fn every_key_must_match() {
        let p = policy(vec![RuleConfig {
            uid: Some(1000),
            unit: Some("app.service".into()),
            ..sa("app@p.iam.gserviceaccount.com")
        }]);
        let mut id = identity(1000, "/system.slice/app.service");
        id.unit = Some("app.service".into());
        assert_eq!(decide(&p, &id).1, Some(10));
        id.uid = 1001;
        assert_eq!(decide(&p, &id).1, None);
        id.uid = 1000;
        id.unit = Some("other.service".into());
        assert_eq!(decide(&p, &id).1, None);
    }

    #[test]
    fn uid_and_user() {
        let p = policy(vec![
            RuleConfig {
                uid: Some(1000),
                ..sa("a@p")
            },
            RuleConfig {
                user: Some("bob".into()),
                ..sa("b@p")
            },
        ]);
        assert_eq!(decide(&p, &identity(1000, "/")).0, "a@p");
        let mut bob = identity(1001, "/");
        bob.user = Some("bob".into());
        assert_eq!(decide(&p, &bob).0, "b@p");
        bob.user = Some("bobby".into());
        assert_eq!(decide(&p, &bob).0, "deny");
        bob.user = None;
        assert_eq!(
            decide(&p, &bob).0,
            "deny",
            "an unknown user name matches no user key"
        );
    }

    #[test]
    fn gid_and_group_match_primary_and_supplementary() {
        let p = policy(vec![
            RuleConfig {
                gid: Some(27),
                ..sa("sudo@p")
            },
            RuleConfig {
                group: Some("docker".into()),
                ..sa("docker@p")
            },
        ]);
        let mut id = identity(1000, "/");
        id.group = Some("alice".into());
        id.group_names = vec!["alice".into()];
        assert_eq!(decide(&p, &id).0, "deny");

        id.groups = vec![1000, 27];
        assert_eq!(decide(&p, &id).0, "sudo@p", "supplementary gid");
        id.groups = vec![1000];
        id.gid = 27;
        assert_eq!(decide(&p, &id).0, "sudo@p", "primary gid");

        id.gid = 1000;
        id.group_names = vec!["alice".into(), "docker".into()];
        assert_eq!(decide(&p, &id).0, "docker@p", "supplementary group name");
        id.group_names = vec![];
        id.group = Some("docker".into());
        assert_eq!(decide(&p, &id).0, "docker@p", "primary group name");
    }

    #[test]
    fn cgroup_star_stays_in_one_component_double_star_crosses() {
        let p = policy(vec![
            RuleConfig {
                cgroup: Some("/system.slice/*.service".into()),
                ..sa("one@p")
            },
            RuleConfig {
                cgroup: Some("/user.slice/**".into()),
                ..sa("user@p")
            },
            RuleConfig {
                cgroup: Some("/**/app.scope".into()),
                ..sa("deep@p")
            },
        ]);
        assert_eq!(
            decide(&p, &identity(0, "/system.slice/app.service")).0,
            "one@p"
        );
        assert_eq!(
            decide(&p, &identity(0, "/system.slice/app.service/worker")).0,
            "deny",
            "`*` must not cross '/'"
        );
        assert_eq!(
            decide(
                &p,
                &identity(0, "/user.slice/user-1000.slice/user@1000.service/x.scope")
            )
            .0,
            "user@p"
        );
        assert_eq!(decide(&p, &identity(0, "/a/b/c/app.scope")).0, "deep@p");
        assert_eq!(decide(&p, &identity(0, "/app.scope")).0, "deep@p");
        assert_eq!(decide(&p, &identity(0, "/user.slicex/a")).0, "deny");
        let mut unknown = identity(0, "/");
        unknown.cgroup = None;
        assert_eq!(
            decide(&p, &unknown).0,
            "deny",
            "an unknown cgroup matches no cgroup key"
        );
    }

    #[test]
    fn unit_under_system_and_user_managers() {
        let p = policy(vec![
            RuleConfig {
                cgroup: Some("/system.slice/**".into()),
                unit: Some("app.service".into()),
                ..sa("system@p")
            },
            RuleConfig {
                unit: Some("app.service".into()),
                ..sa("user@p")
            },
        ]);
        let mut id = identity(0, "/system.slice/app.service");
        id.unit = Some("app.service".into());
        assert_eq!(decide(&p, &id).0, "system@p");
        let mut id = identity(
            1000,
            "/user.slice/user-1000.slice/user@1000.service/app.slice/app.service",
        );
        id.unit = Some("app.service".into());
        assert_eq!(decide(&p, &id).0, "user@p");
    }

    #[test]
    fn slice_matches_any_slice() {
        let p = policy(vec![RuleConfig {
            slice: Some("user-10??.slice".into()),
            ..sa("s@p")
        }]);
        let mut id = identity(1000, "/user.slice/user-1000.slice/session-1.scope");
        id.slices = vec!["user.slice".into(), "user-1000.slice".into()];
        assert_eq!(decide(&p, &id).0, "s@p");
        id.slices = vec!["user.slice".into(), "user-2000.slice".into()];
        assert_eq!(decide(&p, &id).0, "deny");
    }

    #[test]
    fn container_and_pod() {
        let p = policy(vec![
            RuleConfig {
                container: Some("abc*".into()),
                ..sa("container@p")
            },
            RuleConfig {
                pod: Some("1234-*".into()),
                ..sa("pod@p")
            },
        ]);
        let mut id = identity(0, "/");
        id.container = Some("abcdef".into());
        assert_eq!(decide(&p, &id).0, "container@p");
        id.container = Some("defabc".into());
        id.pod = Some("1234-5678".into());
        assert_eq!(decide(&p, &id).0, "pod@p");
        id.pod = None;
        assert_eq!(decide(&p, &id).0, "deny");
    }

    #[test]
    fn grant_carries_limits_and_normalized_conceal() {
        let p = policy(vec![RuleConfig {
            name: Some("app".into()),
            scopes: Some(vec![
                "https://www.googleapis.com/auth/devstorage.read_only".into()
            ]),
            audiences: Some(vec!["https://*.a.run.app".into()]),
            conceal: vec![
                "/computeMetadata/v1/instance/attributes/ssh-keys/".into(),
                "project/attributes/".into(),
                "/instance/attributes/startup-script".into(),
            ],
            ..sa(" app@p.iam.gserviceaccount.com ")
        }]);
        let Outcome::ServiceAccount(grant) = p.decide(&identity(0, "/")).outcome else {
            panic!("the rule grants a service account");
        };
        assert_eq!(grant.email, "app@p.iam.gserviceaccount.com");
        assert_eq!(
            grant.scopes.as_deref(),
            Some(&["https://www.googleapis.com/auth/devstorage.read_only".to_owned()][..])
        );
        let audiences = grant.audiences.as_ref().expect("audiences are limited");
        assert!(audiences.is_match("https://svc-xyz.a.run.app"));
        assert!(!audiences.is_match("https://evil.example/x.a.run.app"));
        assert_eq!(
            grant.conceal,
            [
                "instance/attributes/ssh-keys",
                "project/attributes",
                "instance/attributes/startup-script"
            ]
        );
        assert_eq!(grant.rule_label, "rule 1 \"app\" (line 10)");
    }

    #[test]
    fn labels() {
        let p = policy(vec![
            RuleConfig {
                name: Some("app".into()),
                ..sa("a@p")
            },
            sa("b@p"),
        ]);
        assert_eq!(p.rules[0].label(), "rule 1 \"app\" (line 10)");
        assert_eq!(p.rules[1].label(), "rule 2 (line 20)");
    }

    #[test]
    fn display_one_line_per_rule() {
        let p = policy(vec![
            RuleConfig {
                name: Some("app".into()),
                uid: Some(1000),
                cgroup: Some("/system.slice/app.service".into()),
                scopes: Some(vec!["s1".into()]),
                conceal: vec!["instance/attributes/ssh-keys".into()],
                ..sa("app@p.iam.gserviceaccount.com")
            },
            RuleConfig {
                group: Some("wheel".into()),
                ..act(Action::Passthrough)
            },
        ]);
        assert_eq!(
            p.to_string(),
            "rule 1 \"app\" (line 10): uid=1000 cgroup=\"/system.slice/app.service\" -> \
             service_account app@p.iam.gserviceaccount.com scopes=[\"s1\"] audiences=any \
             conceal=[\"instance/attributes/ssh-keys\"]\n\
             rule 2 (line 20): group=\"wheel\" -> passthrough\n\
             no rule matches -> deny\n"
        );
    }

    #[test]
    fn display_marks_rules_after_a_catch_all() {
        let p = policy(vec![
            act(Action::Deny),
            RuleConfig {
                uid: Some(0),
                ..act(Action::Passthrough)
            },
        ]);
        assert_eq!(
            p.to_string(),
            "rule 1 (line 10): everyone -> deny\n\
             rule 2 (line 20): uid=0 -> passthrough (never reached: rule 1 (line 10) matches \
             everyone)\n"
        );
    }

    #[test]
    fn invalid_glob_names_rule_line_and_key() {
        let e = error(vec![RuleConfig {
            name: Some("bad".into()),
            unit: Some("app[.service".into()),
            line: 7,
            ..sa("a@p")
        }]);
        assert!(matches!(e, PolicyError::Glob { key: "unit", .. }), "{e:?}");
        assert_eq!(e.line(), 7);
        let msg = e.to_string();
        assert!(
            msg.starts_with("rule 1 \"bad\" (line 7): unit = \"app[.service\""),
            "{msg}"
        );
        let e = error(vec![RuleConfig {
            audiences: Some(vec!["{a".into()]),
            ..sa("a@p")
        }]);
        assert!(
            matches!(
                e,
                PolicyError::Glob {
                    key: "audiences",
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn relative_cgroup_is_rejected_with_hint() {
        let e = error(vec![RuleConfig {
            cgroup: Some("system.slice/app.service".into()),
            ..sa("a@p")
        }]);
        assert!(matches!(e, PolicyError::RelativeCgroup { .. }), "{e:?}");
        assert!(
            e.to_string().contains("\"/system.slice/app.service\""),
            "{e}"
        );
    }

    #[test]
    fn exactly_one_outcome() {
        let both = RuleConfig {
            action: Some(Action::Deny),
            ..sa("a@p")
        };
        assert!(matches!(
            error(vec![both]),
            PolicyError::BothOutcomes { .. }
        ));
        assert!(matches!(
            error(vec![rule(3)]),
            PolicyError::NoOutcome { line: 3, .. }
        ));
    }

    #[test]
    fn emails_must_be_addresses() {
        for bad in ["", "  ", "app", "@p", "app@"] {
            assert!(
                matches!(error(vec![sa(bad)]), PolicyError::BadEmail { .. }),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn limits_need_a_grant() {
        let e = error(vec![RuleConfig {
            scopes: Some(vec!["s".into()]),
            ..act(Action::Deny)
        }]);
        assert!(
            matches!(e, PolicyError::LimitWithoutGrant { key: "scopes", .. }),
            "{e:?}"
        );
        let e = error(vec![RuleConfig {
            conceal: vec!["x".into()],
            ..act(Action::Passthrough)
        }]);
        assert!(
            matches!(e, PolicyError::LimitWithoutGrant { key: "conceal", .. }),
            "{e:?}"
        );
    }

    #[test]
    fn empty_scopes_and_conceal_are_rejected() {
        let e = error(vec![RuleConfig {
            scopes: Some(vec![]),
            ..sa("a@p")
        }]);
        assert!(matches!(e, PolicyError::NoScopes { .. }), "{e:?}");
        for path in ["/", "computeMetadata/v1/", "/computeMetadata/v1/"] {
            let e = error(vec![RuleConfig {
                conceal: vec![path.into()],
                ..sa("a@p")
            }]);
            assert!(
                matches!(e, PolicyError::EmptyConceal { .. }),
                "{path:?}: {e:?}"
            );
        }
        let none = policy(vec![RuleConfig {
            audiences: Some(vec![]),
            ..sa("a@p")
        }]);
        let Outcome::ServiceAccount(grant) = none.decide(&identity(0, "/")).outcome else {
            panic!("the rule grants a service account");
        };
        let audiences = grant.audiences.as_ref().expect("audiences = [] is a limit");
        assert!(
            !audiences.is_match("https://x"),
            "audiences = [] allows no audience"
        );
    }
}

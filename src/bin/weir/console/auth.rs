//! Who may look and who may act.
//!
//! - Two tokens: the viewer token lets a caller read every page; the operator token also lets
//!   them act. A person signs in with a token on the login page and gets a session: an
//!   HttpOnly, SameSite=Strict cookie (scripts on the page cannot read it, and other sites'
//!   pages cannot send it). A script sends `Authorization: Bearer <token>` instead.
//! - Every action is a POST. A session's POST carries the session's CSRF token in its form;
//!   without it, or with another, it is refused (403) before anything happens. A bearer token
//!   is not sent by a browser on its own, so a bearer POST needs no CSRF token.
//! - A caller without a valid token gets 401 and the login page; a viewer who tries to act
//!   gets 403.
//! - `--insecure-no-auth` makes every caller an operator (the console warns at start); the
//!   forms still carry a CSRF token, one per console process, so another site's page cannot
//!   post to a console on localhost.

use axum::http::{header, HeaderMap};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The session cookie's name.
pub(crate) const COOKIE: &str = "weir_console_session";
/// How long a session lasts.
const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most; the oldest go first (a login flood cannot grow memory without bound).
const MAX_SESSIONS: usize = 10_000;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Role {
    /// Read every page.
    Viewer,
    /// Read, and act.
    Operator,
}

impl Role {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
        }
    }
}

/// The caller of one request, as the middleware found it.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub(crate) role: Role,
    /// The CSRF token its forms carry and its POSTs must return; `None` for a bearer token.
    pub(crate) csrf: Option<String>,
    /// Whether it came with a session cookie (it can sign out).
    pub(crate) session: bool,
}

/// Why an action is refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    ViewerCannotAct,
    MissingCsrf,
}

impl Caller {
    /// Whether this caller may act, given the CSRF token its form carried.
    pub(crate) fn may_act(&self, form_csrf: Option<&str>) -> Result<(), Refusal> {
        if self.role != Role::Operator {
            return Err(Refusal::ViewerCannotAct);
        }
        match &self.csrf {
            None => Ok(()),
            Some(expected) if form_csrf.is_some_and(|got| same(got, expected)) => Ok(()),
            Some(_) => Err(Refusal::MissingCsrf),
        }
    }
}

struct Session {
    role: Role,
    csrf: String,
    created: Instant,
}

/// The tokens, and the sessions signed in with them.
pub(crate) struct Auth {
    viewer: Option<String>,
    operator: Option<String>,
    insecure: bool,
    /// The forms' CSRF token when there is no authentication.
    insecure_csrf: String,
    sessions: Mutex<HashMap<String, Session>>,
}

fn random_token() -> String {
    // Two v4 UUIDs: 244 random bits from the operating system's generator.
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// Compares secrets in time independent of where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Auth {
    /// Tokens from the configuration; `insecure` lets everyone act without one.
    pub(crate) fn new(viewer: Option<String>, operator: Option<String>, insecure: bool) -> Self {
        Self {
            viewer,
            operator,
            insecure,
            insecure_csrf: random_token(),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the console runs without authentication.
    pub(crate) fn insecure(&self) -> bool {
        self.insecure
    }

    /// The role a token grants, if any.
    pub(crate) fn role_of(&self, token: &str) -> Option<Role> {
        if self.operator.as_deref().is_some_and(|t| same(t, token)) {
            Some(Role::Operator)
        } else if self.viewer.as_deref().is_some_and(|t| same(t, token)) {
            Some(Role::Viewer)
        } else {
            None
        }
    }

    /// Opens a session for `role`; returns its id (the cookie's value).
    pub(crate) fn open_session(&self, role: Role) -> String {
        let id = random_token();
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.retain(|_, s| s.created.elapsed() < SESSION_LIFETIME);
        if sessions.len() >= MAX_SESSIONS {
            if let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.created)
                .map(|(k, _)| k.clone())
            {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(
            id.clone(),
            Session {
                role,
                csrf: random_token(),
                created: Instant::now(),
            },
        );
        id
    }

    /// Ends a session.
    pub(crate) fn close_session(&self, headers: &HeaderMap) {
        if let Some(id) = cookie(headers, COOKIE) {
            self.sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id);
        }
    }

    /// The caller of a request: a bearer token, else a session cookie; `None` if neither is
    /// valid. A bearer token that is present and wrong is not rescued by a cookie.
    pub(crate) fn caller(&self, headers: &HeaderMap) -> Option<Caller> {
        if self.insecure {
            return Some(Caller {
                role: Role::Operator,
                csrf: Some(self.insecure_csrf.clone()),
                session: false,
            });
        }
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            let token = value.to_str().ok()?.strip_prefix("Bearer ")?.trim();
            return self.role_of(token).map(|role| Caller {
                role,
                csrf: None,
                session: false,
            });
        }
        let id = cookie(headers, COOKIE)?;
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let session = sessions.get(id)?;
        (session.created.elapsed() < SESSION_LIFETIME).then(|| Caller {
            role: session.role,
            csrf: Some(session.csrf.clone()),
            session: true,
        })
    }
}

/// A cookie's value from the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The `Set-Cookie` value of a new session.
pub(crate) fn session_cookie(id: &str) -> String {
    format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict")
}

/// The `Set-Cookie` value that ends a session in the browser.
pub(crate) fn expired_cookie() -> String {
    format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(k.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn auth() -> Auth {
        Auth::new(Some("view".into()), Some("operate".into()), false)
    }

    #[test]
    fn no_token_or_a_wrong_one_is_no_caller() {
        let auth = auth();
        assert!(auth.caller(&HeaderMap::new()).is_none());
        assert!(auth
            .caller(&headers(&[(header::AUTHORIZATION, "Bearer nope")]))
            .is_none());
        assert!(auth
            .caller(&headers(&[(header::COOKIE, "weir_console_session=forged")]))
            .is_none());
    }

    #[test]
    fn a_viewer_cannot_act_even_with_a_bearer_token() {
        let auth = auth();
        let viewer = auth
            .caller(&headers(&[(header::AUTHORIZATION, "Bearer view")]))
            .unwrap();
        assert_eq!(viewer.may_act(None), Err(Refusal::ViewerCannotAct));
        let operator = auth
            .caller(&headers(&[(header::AUTHORIZATION, "Bearer operate")]))
            .unwrap();
        assert_eq!(
            operator.may_act(None),
            Ok(()),
            "a bearer needs no CSRF token"
        );
    }

    #[test]
    fn a_session_acts_only_with_its_own_csrf_token() {
        let auth = auth();
        let id = auth.open_session(Role::Operator);
        let cookie = format!("other=1; {COOKIE}={id}");
        let caller = auth.caller(&headers(&[(header::COOKIE, &cookie)])).unwrap();
        let csrf = caller.csrf.clone().unwrap();
        assert_eq!(caller.may_act(None), Err(Refusal::MissingCsrf));
        assert_eq!(caller.may_act(Some("guess")), Err(Refusal::MissingCsrf));
        assert_eq!(caller.may_act(Some(&csrf)), Ok(()));
        let viewer = auth.open_session(Role::Viewer);
        let viewer = auth
            .caller(&headers(&[(header::COOKIE, &format!("{COOKIE}={viewer}"))]))
            .unwrap();
        let csrf = viewer.csrf.clone();
        assert_eq!(
            viewer.may_act(csrf.as_deref()),
            Err(Refusal::ViewerCannotAct)
        );
        auth.close_session(&headers(&[(header::COOKIE, &cookie)]));
        assert!(auth
            .caller(&headers(&[(header::COOKIE, &cookie)]))
            .is_none());
    }

    #[test]
    fn without_auth_everyone_is_an_operator_whose_forms_still_need_csrf() {
        let auth = Auth::new(None, None, true);
        let caller = auth.caller(&HeaderMap::new()).unwrap();
        assert_eq!(caller.role, Role::Operator);
        assert_eq!(caller.may_act(None), Err(Refusal::MissingCsrf));
        assert_eq!(caller.may_act(caller.csrf.as_deref()), Ok(()));
    }

    #[test]
    fn the_session_cookie_is_http_only_and_same_site_strict() {
        let c = session_cookie("abc");
        assert!(
            c.contains("HttpOnly") && c.contains("SameSite=Strict"),
            "{c}"
        );
    }
}

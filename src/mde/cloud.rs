//! Which Microsoft cloud to talk to: API host, sign-in authority and token scope (mde-api.md §1).

use std::fmt;

use url::Url;

/// A Microsoft cloud preset (`--cloud`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Cloud {
    /// Commercial (worldwide) cloud.
    #[default]
    #[value(name = "commercial")]
    Commercial,
    /// US Government Community Cloud.
    #[value(name = "gcc")]
    Gcc,
    /// US Government Community Cloud High.
    #[value(name = "gcc-high")]
    GccHigh,
    /// US Department of Defense cloud.
    #[value(name = "dod")]
    Dod,
}

impl Cloud {
    /// The preset's name as accepted on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Cloud::Commercial => "commercial",
            Cloud::Gcc => "gcc",
            Cloud::GccHigh => "gcc-high",
            Cloud::Dod => "dod",
        }
    }

    /// The preset's endpoints.
    ///
    /// The government scopes use the API host as the token resource; that is not confirmed by
    /// public documentation, hence the `--scope` override ([`resolve_endpoints`]).
    pub fn endpoints(&self) -> Endpoints {
        let (api, authority) = match self {
            Cloud::Commercial => (
                "https://api.securitycenter.microsoft.com",
                "https://login.microsoftonline.com",
            ),
            Cloud::Gcc => (
                "https://api-gcc.securitycenter.microsoft.us",
                "https://login.microsoftonline.com",
            ),
            Cloud::GccHigh | Cloud::Dod => (
                "https://api-gov.securitycenter.microsoft.us",
                "https://login.microsoftonline.us",
            ),
        };
        Endpoints {
            api_url: parse_static(api),
            authority: parse_static(authority),
            scope: format!("{api}/.default"),
        }
    }
}

impl fmt::Display for Cloud {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn parse_static(s: &str) -> Url {
    // The inputs are the constants above; a failure would be a typo caught by the tests.
    Url::parse(s).unwrap_or_else(|e| panic!("built-in URL {s} does not parse: {e}"))
}

/// A regional host of the commercial cloud (mde-api.md §1): calls stay in the region where the
/// tenant's data lives and are answered faster. Tokens are the same as for the global host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Region {
    /// United States.
    Us,
    /// Europe.
    Eu,
    /// United Kingdom.
    Uk,
    /// Australia.
    Au,
    /// Switzerland.
    Swa,
    /// India.
    Ina,
}

impl Region {
    /// The regional API base URL, e.g. `https://eu.api.security.microsoft.com`.
    pub fn api_url(self) -> Url {
        let host = match self {
            Region::Us => "us",
            Region::Eu => "eu",
            Region::Uk => "uk",
            Region::Au => "au",
            Region::Swa => "swa",
            Region::Ina => "ina",
        };
        parse_static(&format!("https://{host}.api.security.microsoft.com"))
    }
}

/// Where the client sends its calls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoints {
    /// MDE API base; paths `/api/...` are appended to its path.
    pub api_url: Url,
    /// Entra ID authority; `/{tenant}/oauth2/v2.0/token` is appended to its path.
    pub authority: Url,
    /// OAuth2 scope requested for tokens (`<resource>/.default`).
    pub scope: String,
}

/// The preset for `cloud` with any explicit overrides applied (regional API hosts, the
/// simulator, an unconfirmed government scope). Overriding the API URL keeps the preset's
/// scope: regional hosts accept tokens for the main resource.
pub fn resolve_endpoints(
    cloud: Cloud,
    api_url: Option<Url>,
    authority: Option<Url>,
    scope: Option<String>,
) -> Endpoints {
    let preset = cloud.endpoints();
    Endpoints {
        api_url: api_url.unwrap_or(preset.api_url),
        authority: authority.unwrap_or(preset.authority),
        scope: scope
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .unwrap_or(preset.scope),
    }
}

/// The API URL of `region` for `cloud`; regional hosts exist only in the commercial cloud.
pub fn regional_api_url(cloud: Cloud, region: Region) -> Result<Url, String> {
    match cloud {
        Cloud::Commercial => Ok(region.api_url()),
        other => Err(format!(
            "--region applies to the commercial cloud only, not {}",
            other.as_str()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn regional_hosts_are_commercial_only_and_keep_the_global_scope() {
        let eu = regional_api_url(Cloud::Commercial, Region::Eu).unwrap();
        assert_eq!(eu.as_str(), "https://eu.api.security.microsoft.com/");
        let e = resolve_endpoints(Cloud::Commercial, Some(eu), None, None);
        assert_eq!(e.scope, "https://api.securitycenter.microsoft.com/.default");
        assert_eq!(e.authority.as_str(), "https://login.microsoftonline.com/");
        assert!(regional_api_url(Cloud::Gcc, Region::Us).is_err());
        let names: Vec<String> = Region::value_variants()
            .iter()
            .map(|r| r.to_possible_value().unwrap().get_name().to_string())
            .collect();
        assert_eq!(names, ["us", "eu", "uk", "au", "swa", "ina"]);
    }

    #[test]
    fn presets_match_the_documented_hosts() {
        let c = Cloud::Commercial.endpoints();
        assert_eq!(
            c.api_url.as_str(),
            "https://api.securitycenter.microsoft.com/"
        );
        assert_eq!(c.authority.as_str(), "https://login.microsoftonline.com/");
        assert_eq!(c.scope, "https://api.securitycenter.microsoft.com/.default");
        let g = Cloud::Gcc.endpoints();
        assert_eq!(
            g.api_url.as_str(),
            "https://api-gcc.securitycenter.microsoft.us/"
        );
        assert_eq!(g.authority.as_str(), "https://login.microsoftonline.com/");
        for cloud in [Cloud::GccHigh, Cloud::Dod] {
            let e = cloud.endpoints();
            assert_eq!(
                e.api_url.as_str(),
                "https://api-gov.securitycenter.microsoft.us/"
            );
            assert_eq!(e.authority.as_str(), "https://login.microsoftonline.us/");
            assert_eq!(
                e.scope,
                "https://api-gov.securitycenter.microsoft.us/.default"
            );
        }
    }

    #[test]
    fn overrides_apply() {
        let sim = Url::parse("http://127.0.0.1:8443/").unwrap();
        let e = resolve_endpoints(
            Cloud::Commercial,
            Some(sim.clone()),
            Some(sim.clone()),
            None,
        );
        assert_eq!(e.api_url, sim);
        assert_eq!(e.authority, sim);
        assert_eq!(e.scope, "https://api.securitycenter.microsoft.com/.default");
        let e = resolve_endpoints(Cloud::GccHigh, None, None, Some(" custom/.default ".into()));
        assert_eq!(e.scope, "custom/.default");
        assert_eq!(e.api_url, Cloud::GccHigh.endpoints().api_url);
        let e = resolve_endpoints(Cloud::Gcc, None, None, Some("  ".into()));
        assert_eq!(e.scope, Cloud::Gcc.endpoints().scope);
    }

    #[test]
    fn value_names_are_the_cli_spelling() {
        let names: Vec<String> = Cloud::value_variants()
            .iter()
            .map(|c| c.to_possible_value().unwrap().get_name().to_owned())
            .collect();
        assert_eq!(names, ["commercial", "gcc", "gcc-high", "dod"]);
        assert_eq!(Cloud::from_str("gcc-high", false), Ok(Cloud::GccHigh));
        assert_eq!(Cloud::default(), Cloud::Commercial);
        assert_eq!(Cloud::Dod.to_string(), "dod");
    }
}

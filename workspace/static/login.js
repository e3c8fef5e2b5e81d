"use strict";
document.getElementById("login-form").onsubmit = async (event) => {
  event.preventDefault();
  const error = document.getElementById("login-error");
  error.textContent = "";
  const r = await fetch("/api/login", {
    method: "POST", headers: {"Content-Type": "application/json"}, credentials: "same-origin",
    body: JSON.stringify({name: document.getElementById("name").value,
                          password: document.getElementById("password").value}),
  });
  if (!r.ok) { error.textContent = "Wrong user name or password."; return; }
  location.assign("/worklist");
};
// "Sign in with <provider>" when single sign-on is configured (the route exists only then)
(async () => {
  try {
    const r = await fetch("/api/login/options", {cache: "no-store", credentials: "same-origin"});
    if (!r.ok) return;
    const sso = (await r.json()).oidc;
    if (!sso) return;
    const link = document.getElementById("sso-link");
    link.textContent = `Sign in with ${sso.name}`;
    document.getElementById("sso").hidden = false;
  } catch (e) { /* local accounts only */ }
})();
